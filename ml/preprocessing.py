"""Image decoding and resizing shared by training, evaluation and the worker.

Cells are crops on a black background of varying size, so an image is padded to a square with
black (keeping the cell's shape) before it is resized to the network's input size.
"""

import io
from pathlib import Path

import numpy as np
import torch
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


# Mean colour of a cell across the NIH training smears (RGB, 0-255); every cell is scaled to it.
REFERENCE_CELL_COLOUR = (178.0, 146.0, 156.0)
# A pixel whose channels sum to at most this is background (cells are cut out onto black).
BACKGROUND_LEVEL = 30.0


def standardise_stain(batch: torch.Tensor) -> torch.Tensor:
    """Scale each image's channels so its cell has the reference mean colour; black stays black.

    Stain colour varies from smear to smear (pink to lavender) far more than within one, and a
    per-channel gain removes most of that variation while keeping the parasite's dark chromatin
    dark relative to its own cell.
    """
    batch = batch.float()
    foreground = (batch.sum(dim=1, keepdim=True) > BACKGROUND_LEVEL).float()
    area = foreground.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    cell_mean = (batch * foreground).sum(dim=(2, 3), keepdim=True) / area
    reference = torch.tensor(REFERENCE_CELL_COLOUR, device=batch.device).view(1, 3, 1, 1)
    return (batch * (reference / cell_mean.clamp(min=1.0))).clamp(0.0, 255.0)


def model_inputs(batch: torch.Tensor, config) -> torch.Tensor:
    """A uint8 (or 0-255 float) NCHW batch as the network of ``config`` expects it."""
    if config.stain_standardise:
        batch = standardise_stain(batch)
    return normalize(batch, config.mean, config.std).contiguous(memory_format=torch.channels_last)


def normalize(batch_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """NHWC or NCHW uint8 (NCHW expected) to normalised float NCHW."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
    return (batch_uint8.float() - mean_t) / std_t


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack HxWx3 uint8 arrays into an NCHW uint8 tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
