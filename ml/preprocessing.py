"""Image decoding and resizing shared by training, evaluation, the worker and the web's upload checks.

Cells are crops on a black background of varying size, so an image is padded to a square with
black (keeping the cell's shape) before it is resized to the network's input size. No torch here:
the web processes decode uploads too, and need not load it (ml.tensors turns pictures into inputs).
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow raises DecompressionBombError above twice this many pixels and warns above it.
Image.MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read."""


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file or bytes to an RGB image, honouring EXIF orientation."""
    try:
        if isinstance(source, bytes):
            return _decode(io.BytesIO(source))
        with open(source, "rb") as stream:
            return _decode(stream)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large to decode safely: {error}") from error
    except Exception as error:  # Pillow raises many kinds on damaged files (TypeError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def _decode(stream) -> Image.Image:
    with Image.open(stream) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, 16-bit, 32-bit float, alpha, grayscale) to 8-bit RGB on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # One float copy, worked on in place: a 4096 px picture is 128 MB of it, not four times that.
        array = np.array(image, dtype=np.float64)
        # ImageJ writes NaN for "no data": black, like the padding, as is any infinite value.
        np.nan_to_num(array, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(array, 0, None, out=array)
        peak = array.max() or 1.0
        # Float images (ImageJ's TIFFs) mostly hold 0..1: Pillow's own conversion would clip them to black.
        array *= 255.0 if image.mode == "F" and peak <= 1.0 else 255.0 / peak
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    # A PNG's tRNS colour key marks the background as transparent without an alpha channel.
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a centred black square, resize to ``size``; returns HxWx3 uint8."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
