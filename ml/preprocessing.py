"""Image decoding and resizing shared by training, evaluation, the worker and the web's upload checks.

Cells are crops on a black background of varying size, so an image is padded to a square with
black (keeping the cell's shape) before it is resized to the network's input size. No torch here:
the web processes decode uploads too, and need not load it (ml.tensors turns pictures into inputs).
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

# Pillow raises DecompressionBombError above twice this many pixels and warns above it.
Image.MAX_IMAGE_PIXELS = 40_000_000
# A PNG's iCCP or zTXt over 1 MB (a calibrated camera's LUT profile) is otherwise refused as corrupt;
# the total stays bounded by PngImagePlugin.MAX_TEXT_MEMORY.
PngImagePlugin.MAX_TEXT_CHUNK = 16 * 1024 * 1024
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read."""


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file or bytes to an RGB image, honouring EXIF orientation."""
    try:
        if isinstance(source, bytes):
            return _decode(io.BytesIO(source), source)
        with open(source, "rb") as stream:
            return _decode(stream, source)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large to decode safely: {error}") from error
    except Exception as error:  # Pillow raises many kinds on damaged files (TypeError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def _decode(stream, source: str | Path | bytes) -> Image.Image:
    with Image.open(stream) as image:
        return picture_rgb(image, source)


def picture_rgb(image: Image.Image, source: str | Path | bytes) -> Image.Image:
    """An opened, not yet loaded image as 8-bit RGB on black, turned as its EXIF orientation says.
    ``source`` is its file or bytes: Pillow keeps only the high byte of 16-bit colour, which is
    read from there again."""
    if _deep_colour_planes(image):
        raise ImageDecodeError(
            "this TIFF keeps its 16-bit colours in separate planes, which cannot be read reliably: "
            "save it with the colours interleaved (contiguous), or as a PNG"
        )
    profile = image.info.get("icc_profile")
    if _deep_colour(image):
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return to_rgb(_in_srgb(ImageOps.exif_transpose(_deep_colour_picture(image, data)), profile))
    image.load()
    if image.format == "BMP" and image.mode == "RGBA" and image.getextrema()[3] == (0, 0):
        image = image.convert("RGB")  # an alpha mask left all 0 (Photoshop): opaque, as Windows shows it
    return to_rgb(_in_srgb(ImageOps.exif_transpose(image), profile))


def _in_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """The picture's colours in sRGB, as the NIH cells and a browser read an untagged picture."""
    if profile and image.mode in ("P", "PA"):  # a palette's colours are in the profile's space too
        image = image.convert("RGBA")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGBA" if image.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):  # a profile that cannot be read: the numbers as sent
        return image


def _deep_colour(image: Image.Image) -> bool:
    """16 bits per colour sample, which Pillow reads as 8 (a BMP's 16-bit pixels are 5-6-5 bits, read right)."""
    args = image.tile[0].args if image.tile else ""
    rawmode = args if isinstance(args, str) else (args or ("",))[0]
    return (
        image.format in ("PNG", "TIFF")
        and image.mode in ("RGB", "RGBA")
        and isinstance(rawmode, str)
        and rawmode.startswith(("RGB;16", "RGBA;16", "RGBX;16", "RGBa;16"))  # a TIFF's extra sample: X, a
    )


def _deep_colour_planes(image: Image.Image) -> bool:
    """A TIFF of more than 8 bits a sample with one plane a colour (PlanarConfiguration 2): Pillow
    reads its planes as 8-bit bands and OpenCV mixes them, each a striped or scrambled picture."""
    if image.format != "TIFF" or image.tag_v2.get(284) != 2:
        return False
    bits = image.tag_v2.get(258, 8)
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8


def _deep_colour_picture(image: Image.Image, data: bytes) -> Image.Image:
    """16-bit colour at its full depth (a 12-bit camera's 0..4095 would otherwise read as 0..15,
    a black picture the model calls Uninfected), scaled to 8 bits as full_scale says."""
    import cv2  # here, not at the top: the web processes decode uploads too, and load OpenCV only for these

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ImageDecodeError("cannot decode this 16-bit colour image")
    colour = cv2.convertScaleAbs(pixels[..., 2::-1], alpha=255.0 / full_scale(int(pixels[..., :3].max())))
    if pixels.shape[2] == 4:  # an alpha of the same depth: opaque at its own full scale
        alpha = cv2.convertScaleAbs(pixels[..., 3], alpha=255.0 / full_scale(int(pixels[..., 3].max())))
        picture = Image.fromarray(np.dstack([colour, alpha]), mode="RGBA")
    else:
        picture = Image.fromarray(np.ascontiguousarray(colour), mode="RGB")
    if image.format == "PNG":  # OpenCV turns a TIFF by its orientation tag itself, a PNG's eXIf it leaves
        picture.info["exif"] = image.getexif().tobytes()  # for exif_transpose
    return picture


def full_scale(peak: int) -> int:
    """The white of integer samples whose largest is ``peak``: that of the shallowest camera depth
    (8, 10, 12, 14 or 16 bits) holding it, so that 12-bit data in a 16-bit file keeps its exposure;
    deeper data is scaled to its peak."""
    for bits in (8, 10, 12, 14, 16):
        if peak <= 2**bits - 1:
            return 2**bits - 1
    return peak


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, 16-bit, 32-bit float, alpha, grayscale) to 8-bit RGB on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # One float copy, worked on in place: a 4096 px picture is 128 MB of it, not four times that.
        array = np.array(image, dtype=np.float64)
        # ImageJ writes NaN for "no data": black, like the padding, as is any infinite value.
        np.nan_to_num(array, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(array, 0, None, out=array)
        peak = array.max()
        if image.mode == "F":  # ImageJ's float TIFFs mostly hold 0..1: Pillow's own conversion would clip them
            array *= 255.0 if peak <= 1.0 else 255.0 / peak
        else:
            array *= 255.0 / full_scale(int(peak))
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
