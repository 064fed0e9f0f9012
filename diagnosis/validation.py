"""Checks an uploaded file is a real, sane image before anything is stored."""

import io
import math
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.uploadedfile import UploadedFile
from PIL import Image, ImageStat

from diagnosis.text import composed
from diagnosis.upload_handlers import spool_folder
from ml.preprocessing import ImageDecodeError, picture_rgb

ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "TIFF", "BMP"}
ALLOWED_DESCRIPTION = "PNG, JPEG, TIFF or BMP"
THUMBNAIL_SIZE = (128, 128)
NAME_MAX_LENGTH = 200
# The model labels whatever it is given, a blank picture included, and would call it Uninfected
# with confidence. The NIH crops it learnt from have pixel values with a standard deviation of at
# least 54 (the black margin around each cell) and sides at most 2.6:1 apart (a crescent-shaped
# gametocyte), so a picture far from that is refused as no cell, not reported as a negative.
MAX_ASPECT = 4
MIN_CONTRAST = 3.0  # the largest channel's standard deviation, on 0-255, at 128 px
# Each NIH cell spans its crop's long side. The model reads a picture padded to a square, so a cell
# in a loose crop reaches it small, and it is misread: on 150 uninfected held-out cells given black
# margins, 9 to 15 false alarms while the cell spans 0.6 or more of the long side, as cropped, then
# 31 at 0.5 and 98 at 0.4. Pictures whose cell spans less are refused.
MIN_CELL_SPAN = 0.6
# What is brighter than this in any channel is the cell, the rest the black margin segmentation
# leaves around it (as in every NIH crop). A light background is all foreground: such a picture is
# taken as one cell filling its crop, never refused as loose or several (a background read off the
# border took a frame, or a cell cropped inside its edge, for the background).
FOREGROUND_LEVEL = 30
# It learnt from colour pictures of Giemsa-stained cells, and in grey ones it misses about half the
# parasites (29 of 60 parasitized cells turned grey were called Uninfected), so they are refused:
# by the file's mode, and by its pixels for a grey picture saved as colour. The NIH cells' channels
# differ by at least 8 somewhere at 128 px; a grey picture's, JPEG's rounding included, by 0 to 2.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
GREY_SPREAD = 2
# Several cells in one picture (a field of view, a contact sheet) are labelled as one, and mostly
# Parasitized (fields of 16 or 36 uninfected NIH cells: 0.32 to 0.88). No NIH crop holds two pieces
# of foreground this large, at 128 px.
CELL_PIECE_SHARE = 0.05


@dataclass(frozen=True)
class ValidImage:
    name: str
    # What is kept of the upload: its picture as the model reads it (turned as its EXIF orientation
    # says, 8-bit RGB on black), as a PNG. Not the file as sent, whose metadata may hold the place the
    # picture was taken (a phone's GPS), the camera's serial number or a patient's name; and the
    # original beside the heatmap is then the very picture the heatmap was computed on.
    picture_png: File  # spooled to FILE_UPLOAD_TEMP_DIR past 1 MB: a batch may hold 100 of them
    width: int  # as displayed: EXIF orientation applied
    height: int
    thumbnail_png: bytes  # PNGs, not the decoded image: a batch of large images would hold gigabytes


def validate_upload(upload: UploadedFile) -> ValidImage:
    name = display_name(getattr(upload, "client_name", upload.name))  # diagnosis.upload_handlers
    if upload.size == 0:
        raise ValidationError(f"{name}: the file is empty.")
    if upload.size > settings.UPLOAD_MAX_BYTES:
        limit_mb = settings.UPLOAD_MAX_BYTES / (1024 * 1024)
        raise ValidationError(f"{name}: the file is larger than the {limit_mb:.0f} MB limit.")
    image = _decode(name, upload.read())
    image.info.clear()  # an ICC profile, or any other text a program wrote, would be saved with it
    width, height = image.size  # before the thumbnail shrinks the image in place
    _check_shows_a_cell(name, image)
    return ValidImage(
        name=name,
        picture_png=_spooled(_png(image)),
        width=width,
        height=height,
        thumbnail_png=_thumbnail_png(image),
    )


def display_name(raw: str | None) -> str:
    """The client's file name reduced to a harmless label (never used as a path)."""
    base = (raw or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    # Composed once the invisible characters are gone: one between a letter and its accent kept them apart.
    cleaned = composed("".join(ch for ch in base if ch.isprintable())).strip() or "upload"
    if len(cleaned) <= NAME_MAX_LENGTH:
        return cleaned
    # Shortened in the middle: the end tells a lab's numbered files apart, and holds the extension.
    keep = NAME_MAX_LENGTH - 1
    return cleaned[: keep - keep // 2] + "…" + cleaned[-(keep // 2) :]


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
    pixels = np.asarray(small, dtype=np.int16)
    if int((pixels.max(axis=2) - pixels.min(axis=2)).max()) <= GREY_SPREAD:
        raise ValidationError(
            f"{name}: the image is greyscale, saved as colour. The model reads colour pictures of Giemsa-stained "
            "cells and misses parasites in grey ones: upload the colour picture."
        )
    foreground = _foreground(pixels)
    if _pieces(foreground) > 1:
        raise ValidationError(
            f"{name}: the image shows several cells; the model labels one cell a picture, so upload one "
            "segmented cell per image."
        )
    span = _span(foreground, width=width, height=height)
    if span < MIN_CELL_SPAN:
        raise ValidationError(
            # Rounded down: 0.597 rounded to "60%" read as meeting the 60% it was refused for.
            f"{name}: the cell spans {math.floor(span * 100)}% of the picture's long side; the model reads cells "
            f"cropped close (at least {MIN_CELL_SPAN:.0%}), and misreads smaller ones: crop the picture closer "
            "to the cell."
        )


def _foreground(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=2) > FOREGROUND_LEVEL


def _span(foreground: np.ndarray, *, width: int, height: int) -> float:
    """How much of the picture's long side the foreground spans, in the picture's own pixels (the
    128 px reduction squeezes one side)."""
    rows, columns = np.nonzero(foreground)
    if not len(rows):
        return 0.0
    across = (columns.max() - columns.min() + 1) / foreground.shape[1] * width
    down = (rows.max() - rows.min() + 1) / foreground.shape[0] * height
    return float(max(across, down) / max(width, height))


def _pieces(foreground: np.ndarray) -> int:
    """Separate pieces of the foreground, each over CELL_PIECE_SHARE of the picture: each foreground
    pixel takes the lowest label around it until none changes (in numpy, about 4 ms at 128 px: the
    web processes load neither OpenCV nor SciPy)."""
    height, width = foreground.shape
    none = foreground.size
    labels = np.where(foreground, np.arange(none).reshape(height, width), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        around = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
        spread = np.where(foreground, np.minimum.reduce(around), none).ravel()
        # A label is the index of a pixel of the same piece: taking that pixel's own label halves the
        # way still to go.
        inside = spread < none
        spread[inside] = spread[spread[inside]]
        spread = spread.reshape(height, width)
        if np.array_equal(spread, labels):
            break
        labels = spread
    _, areas = np.unique(labels[foreground], return_counts=True)
    return int((areas > CELL_PIECE_SHARE * none).sum())


def _thumbnail_png(image: Image.Image) -> bytes:
    image.thumbnail(THUMBNAIL_SIZE)
    return _png(image)


def _spooled(content: bytes) -> File:
    # Deleted when closed or collected, as Django's own upload spools are; nightly swept if a worker dies.
    spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024, dir=spool_folder())  # noqa: SIM115
    spool.write(content)
    spool.seek(0)
    return File(spool, name="upload.png")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # The fastest level: a 4096 px picture takes a second, not six, while its request waits; a
    # cell crop's PNG is a fifth larger than at the default level.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_grey(image: Image.Image) -> bool:
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        return bool((palette == palette[:, :1]).all())
    return image.mode in GREY_MODES


def _decode(name: str, content: bytes) -> Image.Image:
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
                if _is_grey(image):
                    raise ValidationError(
                        f"{name}: the image is greyscale. The model reads colour pictures of Giemsa-stained "
                        "cells and misses parasites in grey ones: upload the colour picture."
                    )
                return picture_rgb(image, content)
    except ValidationError:
        raise
    except ImageDecodeError as refusal:  # a picture it cannot read right, saying why
        raise ValidationError(f"{name}: {refusal}.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValidationError(f"{name}: the image has too many pixels to decode safely.") from None
    except Exception:  # Pillow's decoders raise many kinds (TypeError, struct.error, ...) on crafted files
        raise ValidationError(
            f"{name}: the file is not a readable image (corrupt, truncated or not an image). "
            f"Upload {ALLOWED_DESCRIPTION}."
        ) from None
