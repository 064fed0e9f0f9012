"""Image files a lab really produces, from the upload check through the stored picture to the
worker: read in their own colours, and never refused as blank or corrupt while they show a cell."""

import html
import io
import struct

import numpy as np
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from PIL import Image, ImageCms

from diagnosis import inference, services
from diagnosis.models import Analysis
from ml.predictor import Predictor
from ml.preprocessing import open_rgb
from tests.conftest import fixture_cells
from tests.factories import classified, image_bytes, make_reviewer, upload
from tests.test_ml import SHARED_DATA


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _mluc(text: str) -> bytes:
    t = text.encode("utf-16-be")
    return b"mluc" + b"\0" * 4 + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(t), 28) + t


def icc_profile(name: str, red, green, blue, trc: bytes) -> bytes:
    """An ICC v4 matrix/TRC display profile (as a phone or a microscope camera embeds)."""
    tags = [
        (b"desc", _mluc(name)),
        (b"cprt", _mluc("none")),
        (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", _xyz(*red)),
        (b"gXYZ", _xyz(*green)),
        (b"bXYZ", _xyz(*blue)),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
    ]
    table, body, start = struct.pack(">I", len(tags)), b"", 128 + 4 + 12 * len(tags)
    for signature, data in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    body += b"\0" * (-len(body) % 4)
    header = (
        struct.pack(">I", 128 + len(table) + len(body))
        + b"lcms"
        + bytes([4, 0x30, 0, 0])
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acspAPPL"
        + b"\0" * 24
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"lcms"
        + b"\0" * 44
    )
    return header + table + body


SRGB_CURVE = (
    b"para"
    + b"\0" * 4
    + struct.pack(">HH", 3, 0)
    + b"".join(_s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
)
GAMMA_22 = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 563)
PROFILES = {
    # An iPhone's photos (the NIH cells were photographed through the microscope with a phone).
    "Display P3": icc_profile(
        "Display P3",
        (0.515102, 0.241182, -0.00105),
        (0.291965, 0.692236, 0.041882),
        (0.157153, 0.066583, 0.784378),
        SRGB_CURVE,
    ),
    # A microscope camera's or Photoshop's wide-gamut working space.
    "Adobe RGB (1998)": icc_profile(
        "Adobe RGB (1998)",
        (0.60974, 0.31111, 0.01947),
        (0.20528, 0.62567, 0.06087),
        (0.14919, 0.06322, 0.74457),
        GAMMA_22,
    ),
}


def tagged(cell: Image.Image, profile: bytes) -> bytes:
    """The same cell, its colours written in ``profile``'s space and the profile embedded (lossless)."""
    source = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    target = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(cell, source, target, outputMode="RGB")
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG", icc_profile=profile)
    return buffer.getvalue()


def stored_pixels(analysis: Analysis) -> np.ndarray:
    return np.asarray(Image.open(analysis.image.path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("space", PROFILES)
def test_a_cell_tagged_with_a_wide_gamut_profile_is_kept_and_read_in_its_own_colours(user, space):
    """The profile is dropped and its numbers read as sRGB: the picture stored, shown on the result
    page and classified is a washed-out cell (20 levels off in red for a Display P3 phone photo)."""
    path = fixture_cells()[0]
    cell = Image.open(path).convert("RGB")
    analysis = services.create_analysis(owner=user, upload=upload("phone.png", tagged(cell, PROFILES[space])))
    difference = np.abs(stored_pixels(analysis) - np.asarray(cell, dtype=np.int16))
    assert difference.max() <= 3, f"{space}: stored picture is {difference.max()} levels off the cell it shows"


NIH_CELL = SHARED_DATA / "Parasitized" / "C99P60ThinF_IMG_20150918_141314_cell_121.png"


def test_a_parasitized_cell_in_a_display_p3_photo_gets_the_label_of_the_same_cell_in_srgb(user):
    """Predictor on the NIH PNG: 0.121, Parasitized at threshold 0.11; the same cell sent as a
    Display P3 PNG is stored as 0.077, Uninfected: a missed parasite for a colour tag."""
    assert NIH_CELL.is_file(), f"{NIH_CELL} is missing: clone beside shared/, or set NIH_CELLS"
    expected = Predictor(settings.MODEL_WEIGHTS).predict([open_rgb(NIH_CELL)])[0]
    cell = Image.open(NIH_CELL).convert("RGB")
    analysis = services.create_analysis(owner=user, upload=upload("phone.png", tagged(cell, PROFILES["Display P3"])))
    inference.run_analyses(analysis_ids=[analysis.pk], task_id="p3")
    analysis.refresh_from_db()
    assert analysis.status == "done", analysis.error
    assert analysis.probability_parasitized == pytest.approx(expected.probability_parasitized, abs=0.01)
    assert analysis.label == expected.label


def bmp_with_unused_alpha(cell: Image.Image) -> bytes:
    """A 32-bit BMP with a BITMAPV4 header naming an alpha mask whose bytes are all 0, as Photoshop
    writes one: Windows, Paint and Photoshop show it opaque (image-rs/image#539)."""
    pixels = np.asarray(cell)
    height, width = pixels.shape[:2]
    bgra = np.dstack([pixels[..., 2], pixels[..., 1], pixels[..., 0], np.zeros((height, width), np.uint8)])
    data = bgra[::-1].tobytes()
    info = (
        struct.pack("<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(data), 2835, 2835, 0, 0)
        + struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000)
        + b"BGRs"
        + b"\0" * 48
    )
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(data), 0, 0, 14 + len(info)) + info + data


def test_a_32_bit_bmp_whose_alpha_is_unused_is_analysed_not_refused_as_blank(user):
    """Refused now with 'the image is all one colour (blank, or fully transparent)'."""
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    analysis = services.create_analysis(owner=user, upload=upload("scope.bmp", bmp_with_unused_alpha(cell)))
    assert np.array_equal(stored_pixels(analysis), np.asarray(cell, dtype=np.int16))


def test_a_png_with_a_large_icc_profile_is_not_called_corrupt(user):
    """A PNG whose iCCP chunk holds a profile over 1 MB (a LUT profile of a calibrated camera or
    scanner) is refused as 'not a readable image (corrupt, truncated or not an image)': Pillow's
    PngImagePlugin.MAX_TEXT_CHUNK (1 MB) is exceeded, and the image itself is fine."""
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    big_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    big_profile += bytes(np.random.default_rng(0).integers(0, 256, 1_500_000, dtype=np.uint8))
    buffer = io.BytesIO()
    cell.save(buffer, format="PNG", icc_profile=big_profile)
    analysis = services.create_analysis(owner=user, upload=upload("calibrated.png", buffer.getvalue()))
    assert np.array_equal(stored_pixels(analysis), np.asarray(cell, dtype=np.int16))


def test_a_palette_png_tagged_with_a_wide_gamut_profile_is_read_in_its_own_colours(user):
    """A palette PNG's profile was dropped and its numbers read as sRGB (ImageJ's "8-bit Color")."""
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    truecolour = Image.open(io.BytesIO(tagged(cell, PROFILES["Display P3"])))
    palette = truecolour.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", icc_profile=PROFILES["Display P3"])
    p3 = ImageCms.ImageCmsProfile(io.BytesIO(PROFILES["Display P3"]))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    expected = np.asarray(ImageCms.profileToProfile(palette.convert("RGB"), p3, srgb), dtype=np.int16)
    analysis = services.create_analysis(owner=user, upload=upload("palette.png", buffer.getvalue()))
    difference = np.abs(stored_pixels(analysis) - expected)
    assert difference.max() <= 3, f"stored picture is {difference.max()} levels off the cell it shows"


def test_a_cell_whose_pictures_were_not_restored_says_so_on_its_page(client, user, media_root):
    """After a restore without the media of the same night, a finished cell's page opened with its
    label and two broken pictures, and said nothing of the missing files."""
    cell = classified(services.create_analysis(owner=user, upload=upload("a.png")))
    cell.overlay.save("overlay.png", ContentFile(image_bytes()), save=True)
    client.force_login(user)
    assert "missing-pictures" not in client.get(f"/analyses/{cell.pk}/").content.decode()
    cell.image.storage.delete(cell.image.name)
    page = html.unescape(client.get(f"/analyses/{cell.pk}/").content.decode())
    assert "This cell's original image is missing from the server's storage" in page
    assert "cannot be shown with it." in page
    cell.overlay.storage.delete(cell.overlay.name)
    page = html.unescape(client.get(f"/analyses/{cell.pk}/").content.decode())
    assert "This cell's original image and heatmap are missing" in page and "shown with them." in page


def test_the_review_page_of_a_cell_whose_picture_is_gone_says_so(client, user):
    """The microscopist judges the call on these pictures, and saw a broken image without a word."""
    cell = classified(services.create_analysis(owner=user, upload=upload("a.png")))
    cell.image.storage.delete(cell.image.name)
    reviewer = make_reviewer()
    client.force_login(reviewer)
    page = html.unescape(client.get(f"/review/{cell.pk}/").content.decode())
    assert "This cell's original image is missing from the server's storage" in page


def test_the_printed_report_says_which_cells_pictures_are_missing(client, user):
    """The cell's page and the review page said so, but the report printed the label beside two
    broken picture boxes: on paper, a result without its cell, and no word why."""
    batch = services.create_batch(owner=user, uploads=[upload("kept.png"), upload("lost.png")])
    kept, lost = (classified(cell) for cell in batch.analyses.order_by("original_filename"))
    for cell in (kept, lost):
        cell.overlay.save("overlay.png", ContentFile(image_bytes()), save=True)
    lost.image.storage.delete(lost.image.name)
    lost.overlay.storage.delete(lost.overlay.name)
    client.force_login(user)
    page = html.unescape(client.get(f"/batches/{batch.pk}/report/").content.decode())
    assert page.count("data-missing-pictures") == 1
    assert "Its original image and heatmap are missing from the server's storage" in page
    assert f"/analyses/{lost.pk}/picture/" not in page and f"/analyses/{kept.pk}/picture/" in page
