"""Serving protected media after the caller has checked ownership."""

import mimetypes
from pathlib import PurePosixPath

from django.conf import settings
from django.db.models.fields.files import FieldFile
from django.http import FileResponse, Http404, HttpResponse


def protected_file_response(field_file: FieldFile, *, download_stem: str) -> HttpResponse:
    """The file, named ``download_stem`` plus the stored file's own extension (an original may be a JPEG)."""
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
    extension = PurePosixPath(field_file.name).suffix
    response["Content-Disposition"] = f'inline; filename="{_ascii_name(download_stem + extension)}"'
    # Workstations are shared: no copy of a patient image may outlive the page in the browser's cache.
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def _ascii_name(name: str) -> str:
    return "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\;' else "_" for ch in name) or "file"
