"""Serving protected media after the caller has checked ownership."""

import io
import mimetypes
from pathlib import PurePosixPath

from django.conf import settings
from django.db.models.fields.files import FieldFile
from django.http import FileResponse, Http404, HttpResponse

from ml.preprocessing import ImageDecodeError, open_rgb

# The types a stored file is served as: uploads are kept as PNGs (before 2026-12-02, in the format
# they were sent in), overlays are PNGs.
FILE_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp")


def missing_pictures(analysis) -> list[str]:
    """Which of a cell's stored pictures are gone from storage (a backup restored without its
    media): its page says so, where it showed broken images beside its result without a word."""
    pictures = {"original image": analysis.image, "heatmap": analysis.overlay}
    return [name for name, picture in pictures.items() if picture and not picture.storage.exists(picture.name)]


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
    return _private(response, filename=download_stem + PurePosixPath(field_file.name).suffix)


# What browsers draw in <img>; a TIFF original is shown through a PNG of it (browser_picture).
BROWSER_DRAWN = {".png", ".jpg", ".jpeg", ".bmp"}


def browser_picture(field_file: FieldFile, *, download_stem: str) -> HttpResponse:
    """The original as a browser can draw it: the stored file itself, or a PNG of it decoded as the
    model saw it (EXIF orientation applied, 16-bit and float pictures scaled) for a TIFF kept from
    before uploads were kept as PNGs."""
    if not field_file or PurePosixPath(field_file.name).suffix.lower() in BROWSER_DRAWN:
        return protected_file_response(field_file, download_stem=download_stem)
    try:
        rgb = open_rgb(field_file.path)
    except (FileNotFoundError, ImageDecodeError):
        raise Http404("This file is missing from storage.") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return _private(HttpResponse(buffer.getvalue(), content_type="image/png"), filename=download_stem + ".png")


def _private(response: HttpResponse, *, filename: str) -> HttpResponse:
    response["Content-Disposition"] = f'inline; filename="{_ascii_name(filename)}"'
    # Workstations are shared: no copy of a patient image may outlive the page in the browser's cache.
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def _ascii_name(name: str) -> str:
    return "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\;' else "_" for ch in name) or "file"
