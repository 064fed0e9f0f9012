"""Serving protected media after the caller has checked ownership."""

import mimetypes

from django.conf import settings
from django.db.models.fields.files import FieldFile
from django.http import FileResponse, Http404, HttpResponse


def protected_file_response(field_file: FieldFile, *, download_name: str) -> HttpResponse:
    if not field_file:
        raise Http404("This file does not exist (yet).")
    content_type = mimetypes.guess_type(field_file.name)[0] or "application/octet-stream"
    if not content_type.startswith("image/"):
        content_type = "application/octet-stream"
    if settings.PROTECTED_MEDIA_ACCEL_PREFIX:
        # nginx serves the bytes from an `internal` location; Django only decided who may see them.
        response = HttpResponse(content_type=content_type)
        response["X-Accel-Redirect"] = settings.PROTECTED_MEDIA_ACCEL_PREFIX.rstrip("/") + "/" + field_file.name
    else:
        try:
            response = FileResponse(field_file.open("rb"), content_type=content_type)
        except FileNotFoundError:
            raise Http404("This file is missing from storage.") from None
    response["Content-Disposition"] = f'inline; filename="{_ascii_name(download_name)}"'
    response["Cache-Control"] = "private, max-age=3600"
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def _ascii_name(name: str) -> str:
    return "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\;' else "_" for ch in name) or "file"
