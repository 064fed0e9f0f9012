"""Checks an uploaded file is a real, sane image before anything is stored."""

import io
import warnings
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from PIL import Image, ImageOps, ImageStat

from ml.preprocessing import to_rgb

ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "BMP": "bmp"}
ALLOWED_DESCRIPTION = "PNG, JPEG, TIFF or BMP"
THUMBNAIL_SIZE = (128, 128)
# The model labels whatever it is given, a blank picture included, and would call it Uninfected
# with confidence. The NIH crops it learnt from have sides at most 2.2:1 apart and pixel values
# with a standard deviation of at least 54 (the black margin around each cell), so a picture far
# from that is refused as no cell, not reported as a negative.
MAX_ASPECT = 4
MIN_CONTRAST = 3.0  # the largest channel's standard deviation, on 0-255, at 128 px


@dataclass(frozen=True)
class ValidImage:
    name: str
    content: bytes
    extension: str
    width: int  # as displayed: EXIF orientation applied
    height: int
    thumbnail_png: bytes  # not the decoded image: a batch of large images would hold gigabytes


def validate_upload(upload: UploadedFile) -> ValidImage:
    name = display_name(upload.name)
    if upload.size == 0:
        raise ValidationError(f"{name}: the file is empty.")
    if upload.size > settings.UPLOAD_MAX_BYTES:
        limit_mb = settings.UPLOAD_MAX_BYTES / (1024 * 1024)
        raise ValidationError(f"{name}: the file is larger than the {limit_mb:.0f} MB limit.")
    content = upload.read()
    image_format, image = _decode(name, content)
    width, height = image.size  # before the thumbnail shrinks the image in place
    _check_shows_a_cell(name, image)
    return ValidImage(
        name=name,
        content=content,
        extension=ALLOWED_FORMATS[image_format],
        width=width,
        height=height,
        thumbnail_png=_thumbnail_png(image),
    )


def display_name(raw: str | None) -> str:
    """The client's file name reduced to a harmless label (never used as a path)."""
    base = (raw or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable()).strip()
    return cleaned[:200] or "upload"


def _check_shows_a_cell(name: str, image: Image.Image) -> None:
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ValidationError(
            f"{name}: {width}x{height} px is not a single-cell crop (one side is over {MAX_ASPECT} times "
            "the other); upload one segmented cell per image."
        )
    small = image.resize((128, 128), Image.Resampling.BOX)  # not a copy of a 4096 px picture
    if max(ImageStat.Stat(small).stddev) < MIN_CONTRAST:
        raise ValidationError(
            f"{name}: the image is all one colour (blank, or fully transparent), so it shows no cell to analyse."
        )


def _thumbnail_png(image: Image.Image) -> bytes:
    image.thumbnail(THUMBNAIL_SIZE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(name: str, content: bytes) -> tuple[str, Image.Image]:
    max_side, min_side = settings.UPLOAD_MAX_SIDE, settings.UPLOAD_MIN_SIDE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise ValidationError(
                        f"{name}: {image.format or 'this'} files are not accepted; upload {ALLOWED_DESCRIPTION}."
                    )
                width, height = image.size
                # Checked from the header, before any pixel is decoded.
                if width > max_side or height > max_side:
                    raise ValidationError(
                        f"{name}: {width}x{height} px is too large; the maximum is {max_side}x{max_side}."
                    )
                if width < min_side or height < min_side:
                    raise ValidationError(
                        f"{name}: {width}x{height} px is too small; the minimum is {min_side}x{min_side}."
                    )
                # An MPO is a JPEG with extra pictures (a phone's preview or gain map): its first is the photo.
                if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
                    raise ValidationError(f"{name}: multi-frame images are not accepted; upload a single cell.")
                image.load()
                return image.format, to_rgb(ImageOps.exif_transpose(image))
    except ValidationError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValidationError(f"{name}: the image has too many pixels to decode safely.") from None
    except Exception:  # Pillow's decoders raise many kinds (TypeError, struct.error, ...) on crafted files
        raise ValidationError(
            f"{name}: the file is not a readable image (corrupt, truncated or not an image). "
            f"Upload {ALLOWED_DESCRIPTION}."
        ) from None
