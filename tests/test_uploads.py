"""Bad uploads are refused with a clear 4xx and leave no row and no file behind."""

import errno
import html
import io
import random
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image, ImageDraw, ImageOps

from diagnosis import services
from diagnosis.models import Analysis, Batch, private_storage
from diagnosis.validation import validate_upload
from tests.conftest import fixture_cells, stored_files
from tests.factories import image_bytes, upload


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size but whose pixel data stops after a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)[:20])


def bomb_png() -> bytes:
    """9000 x 9000 px (81 Mpx) that compresses to a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


BAD_FILES = {
    "text": (b"this is not an image at all", "text/plain", "not a readable image"),
    "zero-bytes": (b"", "image/png", "empty"),
    "truncated-png": (image_bytes(size=(200, 200))[:300], "image/png", "not a readable image"),
    "header-only-png": (png_header_only(64, 64), "image/png", "not a readable image"),
    "tiny": (image_bytes(size=(4, 4)), "image/png", "too small"),
    "huge-dimensions": (png_header_only(20000, 20000), "image/png", "too many pixels"),
    "over-max-side": (png_header_only(5000, 3000), "image/png", "too large"),
    "gif": (image_bytes(fmt="GIF"), "image/gif", "not accepted"),
    "html-as-png": (b"<html><script>alert(1)</script></html>", "image/png", "not a readable image"),
}


@pytest.fixture
def no_leftovers(db, media_root):
    before = set(stored_files(media_root))
    yield
    assert Analysis.objects.count() == 0 and Batch.objects.count() == 0
    assert set(stored_files(media_root)) == before


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_api_refuses_bad_file(api_client, no_leftovers, case):
    content, content_type, message = BAD_FILES[case]
    response = api_client.post("/api/analyses/", {"image": upload(f"{case}.png", content, content_type)})
    assert response.status_code == 400
    assert message in response.json()["detail"]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_web_form_shows_why_a_file_was_refused(web_client, no_leftovers, case):
    content, content_type, message = BAD_FILES[case]
    response = web_client.post("/upload/", {"images": [upload(f"{case}.png", content, content_type)]})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert "Nothing was stored" in response.content.decode()


def test_one_bad_file_in_a_batch_stores_nothing(api_client, no_leftovers):
    good = [upload(p.name, p.read_bytes()) for p in fixture_cells()]
    response = api_client.post("/api/batches/", {"images": [*good, upload("broken.png", b"nope")]})
    assert response.status_code == 400
    assert "broken.png" in response.json()["detail"]


def test_the_upload_page_names_every_refused_file_at_once(web_client, no_leftovers):
    """The form stopped at the first empty file, so the others and the damaged ones went unnamed: a
    file input cannot be refilled, and the clinician chose the whole folder again per bad file."""
    images = [
        upload("good.png"),
        upload("empty-1.png", b""),
        upload("empty-2.png", b""),
        upload("cut-short.png", image_bytes(size=(200, 200))[:300]),
    ]
    page = web_client.post("/upload/", {"images": images})
    assert page.status_code == 400 and "Nothing was stored" in page.content.decode()
    for refused in ("empty-1.png: the file is empty.", "empty-2.png: the file is empty.", "cut-short.png"):
        assert refused in page.content.decode()


def test_decompression_bomb_is_refused_by_the_pixel_guard(api_client, no_leftovers, settings):
    settings.UPLOAD_MAX_SIDE = 100_000  # so only Pillow's decompression-bomb limit can stop it
    response = api_client.post("/api/analyses/", {"image": upload("bomb.png", bomb_png())})
    assert response.status_code == 400
    assert "too many pixels" in response.json()["detail"]


def test_file_over_the_size_limit(api_client, no_leftovers, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    response = api_client.post(
        "/api/analyses/", {"image": upload("big.png", image_bytes(size=(300, 300)) + b"0" * 2000)}
    )
    assert response.status_code == 400 and "limit" in response.json()["detail"]


def test_request_over_the_size_limit_is_refused_before_reading(api_client, no_leftovers, settings):
    settings.REQUEST_MAX_BYTES = 10_000
    response = api_client.post("/api/analyses/", {"image": upload("big.png", b"x" * 20_000)})
    assert response.status_code == 413 and "too large" in response.json()["detail"]


def test_an_upload_too_large_sent_without_javascript_gets_a_page(web_client, no_leftovers, settings, user):
    """The upload form sent without JavaScript was answered with a line of JSON in bytes; upload.js
    and the API still get JSON, which they read."""
    settings.REQUEST_MAX_BYTES = 20_000
    images = {"images": [upload(f"{n}.png", b"x" * 8000) for n in range(3)]}
    page = web_client.post("/upload/", images)
    assert page.status_code == 413 and page["Content-Type"].startswith("text/html")
    text = re.sub(r"[ \n]+", " ", page.content.decode())
    assert "Nothing was stored: the upload was" in text and "over the limit of 19.5\xa0KB for one upload" in text
    assert f"Log out {user.username}" in text
    assert page["Cache-Control"] == "private, no-store"  # a signed-in page, kept by no browser, as the others
    for image in images["images"]:
        image.seek(0)
    scripted = web_client.post("/upload/", images, headers={"X-Requested-With": "XMLHttpRequest"})
    assert scripted.status_code == 413 and "too large" in scripted.json()["detail"]


def test_too_many_files_in_a_batch(api_client, no_leftovers, settings):
    settings.BATCH_MAX_FILES = 2
    files = [upload(f"{i}.png") for i in range(3)]
    response = api_client.post("/api/batches/", {"images": files})
    assert response.status_code == 400 and "at most 2" in response.json()["detail"]


def test_one_file_over_the_batch_limit_is_refused_with_the_limit_named(api_client, web_client, no_leftovers, settings):
    """Django stops reading at DATA_UPLOAD_MAX_NUMBER_FILES, before the upload service could count."""
    files = [upload(f"{i}.png") for i in range(settings.BATCH_MAX_FILES + 1)]
    expected = f"A batch holds at most {settings.BATCH_MAX_FILES} images; this request sent more."
    response = api_client.post("/api/batches/", {"images": files})
    assert response.status_code == 400 and response.json()["detail"] == expected
    for file in files:
        file.seek(0)
    page = web_client.post("/upload/", {"images": files})
    assert page.status_code == 400 and expected in page.content.decode()
    assert "Back to the upload page" in page.content.decode()


def test_a_batch_names_the_file_that_is_refused(api_client, no_leftovers):
    response = api_client.post("/api/batches/", {"images": [upload("good.png"), upload("blank.png", b"")]})
    assert response.status_code == 400 and response.json()["detail"] == "blank.png: the file is empty."
    not_a_file = api_client.post("/api/batches/", {"images": "just text"})
    assert not_a_file.status_code == 400
    assert not_a_file.json()["detail"].startswith("A part named images is not a file")


def test_json_instead_of_multipart_is_415(api_client, no_leftovers):
    response = api_client.post("/api/analyses/", {"image": "x"}, format="json")
    assert response.status_code == 415


def test_missing_file_field(api_client, no_leftovers):
    response = api_client.post("/api/analyses/", {})
    assert response.status_code == 400 and "image" in response.json()


@pytest.mark.parametrize("name", ["../../etc/passwd.png", "..\\..\\boot.png", "ünïcødé cell.png", "a" * 300 + ".png"])
def test_client_file_names_are_data_never_paths(api_client, media_root, name):
    response = api_client.post("/api/analyses/", {"image": upload(name)})
    assert response.status_code == 202
    analysis = Analysis.objects.get()
    assert "/" not in analysis.original_filename and len(analysis.original_filename) <= 200
    assert analysis.image.name.startswith("uploads/") and ".." not in analysis.image.name
    assert (media_root / analysis.image.name).resolve().is_relative_to(media_root.resolve())


def test_a_long_file_name_is_shortened_in_the_middle_keeping_its_numbered_end(api_client):
    """Cut at its 200th character, a lab's long names lost the cell number and the extension."""
    stem = "C100P61ThinF_IMG_20150918_144104_" + "x" * 200  # Django itself keeps 255 characters
    api_client.post("/api/batches/", {"images": [upload(f"{stem}_cell_{n}.png") for n in (1, 2)]})
    names = list(Analysis.objects.order_by("pk").values_list("original_filename", flat=True))
    assert [len(name) for name in names] == [200, 200]
    assert names[0].startswith("C100P61ThinF_IMG_") and names[0].endswith("x_cell_1.png") and "…" in names[0]
    assert names[1].endswith("_cell_2.png")


def test_odd_but_valid_images_are_accepted(api_client, db):
    buffer = io.BytesIO()
    translucent = Image.new("RGBA", (50, 40), (0, 0, 0, 0))
    translucent.paste((200, 10, 10, 128), (5, 4, 45, 36))  # a half-transparent cell on a clear margin
    translucent.save(buffer, format="PNG")
    for name, content in {
        "rgba.png": buffer.getvalue(),
        "photo.jpg": image_bytes(fmt="JPEG"),
        "scan.tiff": image_bytes(fmt="TIFF"),
        "old.bmp": image_bytes(fmt="BMP"),
    }.items():
        response = api_client.post("/api/analyses/", {"image": upload(name, content)})
        assert response.status_code == 202, response.json()
    assert Analysis.objects.filter(status=Analysis.Status.QUEUED).count() == 4


def test_the_status_poll_ignores_ids_that_are_not_plain_numbers(client, user):
    analysis = services.create_analysis(owner=user, upload=upload())
    client.force_login(user)
    response = client.get(f"/status.json?ids=²,{analysis.pk},x,-1,٣")  # superscript and Arabic-Indic digits
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["analyses"]] == [analysis.pk]


def test_the_status_poll_ignores_ids_too_long_to_be_a_row(client, user):
    analysis = services.create_analysis(owner=user, upload=upload())
    client.force_login(user)
    response = client.get(f"/status.json?ids={'9' * 25},{analysis.pk}")
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["analyses"]] == [analysis.pk]


def test_a_batch_note_has_a_length_limit(api_client, web_client, no_leftovers):
    long_note = "n" * 2001
    response = api_client.post("/api/batches/", {"images": [upload()], "note": long_note})
    assert response.status_code == 400 and "note" in response.json()["detail"].lower()
    page = web_client.post("/upload/", {"images": [upload()], "note": long_note})
    assert page.status_code == 400 and "at most 2000 characters" in page.content.decode()


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's remarks on the damage
def test_mutated_images_are_either_accepted_or_refused_with_a_message():
    """Random byte damage to small PNG, TIFF, BMP and JPEG files: Pillow raises many kinds of error
    on such files (TypeError, struct.error, ...); every one must become a message, never a 500."""
    from django.core.exceptions import ValidationError
    from django.core.files.uploadedfile import SimpleUploadedFile

    from diagnosis.validation import validate_upload

    originals = [image_bytes(size=(32, 32), fmt=fmt) for fmt in ("PNG", "TIFF", "BMP", "JPEG")]
    lzw = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 100, 150)).save(lzw, format="TIFF", compression="tiff_lzw")
    originals.append(lzw.getvalue())
    rng = random.Random(20261127)
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(3000):
        damaged = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.2:
            damaged = damaged[: rng.randrange(1, len(damaged))]
        try:
            validate_upload(SimpleUploadedFile("damaged.tif", bytes(damaged)))
            outcomes["accepted"] += 1
        except ValidationError as error:
            assert "damaged.tif" in error.messages[0]
            outcomes["refused"] += 1
    assert outcomes["accepted"] and outcomes["refused"]


def test_a_tiff_upload_is_kept_as_a_png_that_browsers_draw(client, user, other_user):
    """Chrome and Firefox draw no TIFF in <img>; a PNG of the picture is what is kept and shown."""
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    buffer = io.BytesIO()
    cell.save(buffer, format="TIFF")
    tiff = services.create_analysis(owner=user, upload=upload("cell.tif", buffer.getvalue(), "image/tiff"))
    assert tiff.image.name.endswith(".png")
    client.force_login(user)
    for kind in ("picture", "image"):
        drawn = client.get(f"/analyses/{tiff.pk}/{kind}/")
        assert drawn.status_code == 200 and drawn["Content-Type"] == "image/png"
        assert drawn["Cache-Control"] == "private, no-store" and drawn["X-Content-Type-Options"] == "nosniff"
        picture = Image.open(io.BytesIO(b"".join(drawn.streaming_content)))
        assert picture.format == "PNG" and picture.convert("RGB").tobytes() == cell.tobytes()
    client.force_login(other_user)
    assert client.get(f"/analyses/{tiff.pk}/picture/").status_code == 404


def test_a_tiff_original_stored_before_pngs_were_kept_is_drawn_as_png_and_downloaded_as_stored(client, user):
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    buffer = io.BytesIO()
    cell.save(buffer, format="TIFF")
    analysis = services.create_analysis(owner=user, upload=upload("cell.tif", buffer.getvalue(), "image/tiff"))
    earlier = private_storage.save("uploads/earlier.tif", ContentFile(buffer.getvalue()))
    Analysis.objects.filter(pk=analysis.pk).update(image=earlier)
    client.force_login(user)
    page = client.get(f"/analyses/{analysis.pk}/").content.decode()
    assert f'src="/analyses/{analysis.pk}/picture/"' in page and f'src="/analyses/{analysis.pk}/image/"' not in page
    drawn = client.get(f"/analyses/{analysis.pk}/picture/")
    assert drawn["Content-Type"] == "image/png" and Image.open(io.BytesIO(drawn.content)).size == cell.size
    sent = client.get(f"/analyses/{analysis.pk}/image/")
    assert sent["Content-Type"] == "image/tiff" and b"".join(sent.streaming_content) == buffer.getvalue()


@pytest.mark.parametrize(
    ("picture", "message"),
    [
        (Image.new("RGB", (4000, 4000), (240, 240, 240)), "all one colour"),
        (Image.new("RGBA", (120, 120), (0, 0, 0, 0)), "all one colour"),
        (Image.new("RGB", (16, 3000), (255, 0, 0)), "not a single-cell crop"),
        (Image.new("RGB", (500, 100), (255, 0, 0)), "not a single-cell crop"),
    ],
)
def test_a_picture_of_no_cell_is_refused_not_reported_as_uninfected(
    api_client, web_client, no_leftovers, picture, message
):
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    response = api_client.post("/api/analyses/", {"image": upload("nothing.png", buffer.getvalue())})
    assert response.status_code == 400 and message in response.json()["detail"]
    page = web_client.post("/upload/", {"images": [upload("nothing.png", buffer.getvalue())]})
    assert page.status_code == 400 and message in page.content.decode()


def _encoded(picture: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def _fixture_cell(index: int = 0) -> Image.Image:
    return Image.open(fixture_cells()[index]).convert("RGB")


def _padded(cell: Image.Image, aspect: float) -> Image.Image:
    """The cell with black margins either side, as a segmentation tool's wide box leaves it."""
    crop = Image.new("RGB", (round(cell.width * aspect), cell.height))
    crop.paste(cell, ((crop.width - cell.width) // 2, 0))
    return crop


def _field(per_side: int) -> Image.Image:
    """Cells on a black contact sheet, as a segmentation tool lays them out."""
    field = Image.new("RGB", (per_side * 130, per_side * 130))
    for index in range(per_side * per_side):
        field.paste(_fixture_cell(index % len(fixture_cells())), ((index % per_side) * 130, (index // per_side) * 130))
    return field


@pytest.mark.parametrize(
    "name, content, message",
    [
        # The shipped model called this parasitized cell Uninfected (p 0.066) in grey, 66 of 119 so.
        ("grey.png", lambda: _encoded(ImageOps.grayscale(_fixture_cell()).convert("RGB"), "PNG"), "greyscale"),
        ("grey.jpg", lambda: _encoded(ImageOps.grayscale(_fixture_cell()).convert("RGB"), "JPEG"), "greyscale"),
        # Padded to 3:1 the cell spans a third of the picture: it called an uninfected one Parasitized (p 0.319).
        ("wide.png", lambda: _encoded(_padded(_fixture_cell(2), 3.0), "PNG"), "crop the picture closer"),
        ("loose.png", lambda: _encoded(ImageOps.expand(_fixture_cell(2), border=80), "PNG"), "crop the picture closer"),
        # Nine uninfected cells in one picture: one Parasitized cell at p 0.577; on a light smear, 0.61.
        ("field.png", lambda: _encoded(_field(3), "PNG"), "several cells"),
    ],
)
def test_a_picture_the_model_would_misread_is_refused_saying_why(
    api_client, web_client, no_leftovers, name, content, message
):
    response = api_client.post("/api/analyses/", {"image": upload(name, content())})
    assert response.status_code == 400 and message in response.json()["detail"], response.content
    page = web_client.post("/upload/", {"images": [upload(name, content())]})
    assert page.status_code == 400 and message in page.content.decode()


def test_pieces_of_a_picture_are_counted_as_opencv_counts_them():
    """The web's numpy count of a picture's pieces (diagnosis.validation) against OpenCV's, on
    discs, a serpentine whose end is a long way round from its start, and dust."""
    from diagnosis.validation import CELL_PIECE_SHARE, _pieces

    def opencv_count(picture) -> int:
        foreground = (picture.sum(axis=2) > 30).astype(np.uint8)
        areas = cv2.connectedComponentsWithStats(foreground, connectivity=8)[2][1:, cv2.CC_STAT_AREA]
        return int((areas > CELL_PIECE_SHARE * foreground.size).sum())

    rng = np.random.default_rng(3)
    pictures = []
    for discs in (1, 2, 3, 4):  # in the corners, of random sizes: some touch, some are too small
        picture = np.zeros((128, 128, 3), dtype=np.uint8)
        for centre in [(32, 32), (96, 96), (96, 32), (32, 96)][:discs]:
            cv2.circle(picture, centre, int(rng.integers(14, 34)), (200, 100, 150), -1)
        pictures.append(picture)
    serpentine = np.zeros((128, 128, 3), dtype=np.uint8)
    points = [(8 if row % 2 else 120, 8 + row * 12) for row in range(10)]
    points = [p for a, b in zip(points, points[1:], strict=False) for p in (a, (a[0], b[1]))]
    cv2.polylines(serpentine, [np.array(points, dtype=np.int32)], False, (200, 100, 150), 3)
    dust = np.zeros((128, 128, 3), dtype=np.uint8)
    dust[::16, ::16] = 255
    pictures += [serpentine, dust]
    counted = [_pieces(picture.sum(axis=2, dtype=np.int16) > 30) for picture in pictures]
    assert counted == [opencv_count(picture) for picture in pictures]
    assert counted[-2:] == [1, 0] and max(counted) >= 2


def test_a_cell_in_faint_colour_is_not_taken_for_grey(api_client):
    """The least colourful NIH cell's channels differ by 8 at most: a stain as faint is still read."""
    faint = image_bytes(color=(132, 128, 124))
    assert api_client.post("/api/analyses/", {"image": upload("faint.png", faint)}).status_code == 202
    for cell in fixture_cells():
        assert api_client.post("/api/analyses/", {"image": upload(cell.name, cell.read_bytes())}).status_code == 202


def test_a_cell_as_long_as_its_crop_is_accepted_however_narrow(api_client):
    """A crescent-shaped gametocyte (the NIH set's longest crop is 2.6:1) spans its crop: it reaches
    the model at the scale the NIH cells do, unlike a round cell padded to the same shape."""
    crescent = Image.new("RGB", (205, 79))
    ImageDraw.Draw(crescent).ellipse([2, 6, 202, 72], fill=(180, 110, 170))
    ImageDraw.Draw(crescent).ellipse([90, 30, 110, 45], fill=(90, 40, 120))
    assert (
        api_client.post("/api/analyses/", {"image": upload("crescent.png", _encoded(crescent, "PNG"))}).status_code
        == 202
    )
    cell = _fixture_cell(0)
    inside = cell.crop((cell.width // 10, cell.height // 10, cell.width * 9 // 10, cell.height * 9 // 10))
    faint = np.full((100, 100, 3), (225, 212, 218), dtype=np.uint8)
    faint[((np.mgrid[:100, :100] - 50) ** 2).sum(axis=0) < 1600] = (205, 188, 196)
    single_cells = {
        "smear.png": ImageOps.expand(cell, border=4, fill=(226, 214, 222)),  # on a light smear
        "inside.png": inside,  # cropped inside its edge, as "crop closer" may lead to
        "faint.png": Image.fromarray(faint),  # a pale cell on a light smear
        "framed.png": ImageOps.expand(cell, border=2, fill=(255, 255, 255)),
    }
    for name, picture in single_cells.items():
        response = api_client.post("/api/analyses/", {"image": upload(name, _encoded(picture, "PNG"))})
        assert response.status_code == 202, response.json()


def test_every_nih_cell_shape_and_contrast_is_accepted(api_client):
    from diagnosis.validation import MAX_ASPECT

    for ratio in (1, 2.2, MAX_ASPECT):  # the NIH crops reach 2.2:1
        content = image_bytes(size=(round(30 * ratio), 30))
        assert api_client.post("/api/analyses/", {"image": upload("cell.png", content)}).status_code == 202, ratio


def test_the_same_images_sent_again_after_back_are_stored_once_and_others_are_a_new_upload(web_client):
    """After Back a browser may fetch the form afresh with the chosen files put back but not the
    reference: sent again, those images store nothing twice, with or without the reference; the
    next patient's images are that patient's batch."""
    cells = fixture_cells()

    def send(reference: str, files):
        images = [upload(cell.name, cell.read_bytes()) for cell in files]
        return web_client.post("/upload/", {"sample_reference": reference, "note": "", "images": images})

    first = send("PATIENT-A", cells[:1])
    patient_a = Batch.objects.get()
    assert first.url == f"/batches/{patient_a.pk}/"
    for reference in ("PATIENT-A", ""):  # the form as it was, or as Back left it (reference gone)
        assert send(reference, cells[:1]).url == f"/batches/{patient_a.pk}/"
    assert Batch.objects.count() == 1, "the same images sent again store nothing twice"
    assert "already uploaded as batch" in web_client.get(f"/batches/{patient_a.pk}/").content.decode()

    following = send("PATIENT-B", cells[1:3])
    patient_b = Batch.objects.exclude(pk=patient_a.pk).get()
    assert following.url == f"/batches/{patient_b.pk}/"
    assert (patient_b.sample_reference, patient_b.analyses.count()) == ("PATIENT-B", 2)
    send("PATIENT-B", cells[3:4])  # a second slide of the same patient: other images, another batch
    assert Batch.objects.count() == 3
    Batch.objects.filter(pk=patient_a.pk).delete()
    send("PATIENT-A", cells[:1])  # once its batch is deleted, the same images may be stored again
    assert Batch.objects.count() == 3 and Batch.objects.filter(sample_reference="PATIENT-A").exists()


@pytest.mark.parametrize("spooled", [False, True])
def test_stored_files_take_the_configured_mode(api_client, media_root, settings, spooled):
    """scripts/start keeps patient images to their own user (600): a shared PC's other accounts
    must not read them, whether the upload was held in memory or spooled to disk on the way."""
    settings.FILE_UPLOAD_PERMISSIONS = 0o600
    if spooled:
        settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 10
    before = set(media_root.rglob("*"))
    cell = fixture_cells()[0]
    response = api_client.post("/api/analyses/", {"image": upload(cell.name, cell.read_bytes())}, format="multipart")
    assert response.status_code == 202, response.content
    files = [path for path in set(media_root.rglob("*")) - before if path.is_file()]
    assert len(files) == 2  # the upload and its thumbnail
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o600)}


def test_a_large_upload_is_taken_after_its_spool_folder_was_removed(api_client, media_root, settings):
    """Settings made media/incoming only at start: media restored or cleaned by hand while the site
    ran took it away, and every upload past FILE_UPLOAD_MAX_MEMORY_SIZE was a 500 until a restart."""
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 10  # every upload spools, as a 2 MB photo does
    cell = fixture_cells()[0]
    shutil.rmtree(media_root / "incoming")
    try:
        response = api_client.post("/api/analyses/", {"image": upload(cell.name, cell.read_bytes())})
    finally:
        (media_root / "incoming").mkdir(exist_ok=True)
    assert response.status_code == 202, response.content
    assert Analysis.objects.get(pk=response.json()["id"]).original_filename == cell.name


def test_what_is_kept_of_a_photo_is_its_picture_without_the_files_metadata(client, user):
    """A phone on a microscope geotags its pictures; cameras write their serial numbers. None of it
    is kept or handed out, and the original shown is turned as the heatmap's picture is."""
    wide = Image.open(fixture_cells()[0]).convert("RGB").resize((120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to display
    exif[0x010F], exif[0x0110] = "Olympus", "CX43-CAM"
    exif[0xA431] = "SERIAL-0042"  # the camera body's serial number
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)})  # GPS
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    assert b"SERIAL-0042" in buffer.getvalue()
    photo = services.create_analysis(owner=user, upload=upload("ward photo.jpg", buffer.getvalue(), "image/jpeg"))
    client.force_login(user)
    for url in (f"/analyses/{photo.pk}/picture/", f"/analyses/{photo.pk}/image/", f"/api/analyses/{photo.pk}/image/"):
        served = b"".join(client.get(url).streaming_content)
        assert b"SERIAL-0042" not in served and b"Olympus" not in served and b"Exif" not in served
        picture = Image.open(io.BytesIO(served))
        assert picture.format == "PNG" and picture.size == (60, 120) and not picture.getexif()


def tiff_16_bit(
    pixels: np.ndarray, orientation: int = 1, extra_sample: int | None = None, *, planar: bool = False
) -> bytes:
    """An uncompressed 16-bit colour TIFF with an orientation tag (Pillow writes none, OpenCV no tag);
    with ``extra_sample`` (its ExtraSamples tag), a fourth sample after R, G and B; ``planar``: each
    sample in a strip of its own (PlanarConfiguration 2), as tifffile writes a 3 x H x W array."""
    height, width, samples = pixels.shape
    planes = [pixels[..., k] for k in range(samples)] if planar else [pixels]
    strips = [np.ascontiguousarray(plane).astype("<u2").tobytes() for plane in planes]
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, samples, "bits"), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, len(strips), "offsets"), (274, 3, 1, orientation), (277, 3, 1, samples), (278, 3, 1, height),
            (279, 4, len(strips), "counts"), (284, 3, 1, 2 if planar else 1)]  # fmt: skip
    if extra_sample is not None:
        tags.append((338, 3, 1, extra_sample))
    directory_size = 2 + 12 * len(tags) + 4
    bits_at = 8 + directory_size
    offsets_at = bits_at + 2 * samples
    counts_at = offsets_at + (4 * len(strips) if planar else 0)  # one strip's offset and count are inline
    data_at = counts_at + (4 * len(strips) if planar else 0)
    offsets = [data_at + sum(len(strip) for strip in strips[:k]) for k in range(len(strips))]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, kind, count, value in tags:
        if value == "offsets":
            value = offsets_at if planar else offsets[0]
        elif value == "counts":
            value = counts_at if planar else len(strips[0])
        elif value == "bits":
            value = bits_at
        inline = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + inline
    out += struct.pack("<I", 0) + struct.pack("<" + "H" * samples, *[16] * samples)
    if planar:
        out += struct.pack(f"<{len(strips)}I", *offsets) + struct.pack(f"<{len(strips)}I", *map(len, strips))
    return bytes(out + b"".join(strips))


def png_16_bit(rgb: np.ndarray, orientation: int) -> bytes:
    """A 16-bit RGB PNG with an eXIf orientation (OpenCV writes the pixels, the chunk is added)."""
    png = cv2.imencode(".png", rgb.astype(np.uint16)[..., ::-1])[1].tobytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:]  # without its "Exif\0\0" prefix
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return png[:33] + chunk + png[33:]  # after IHDR


@pytest.mark.parametrize("orientation", [6, 5, 3])
@pytest.mark.parametrize("write", [tiff_16_bit, png_16_bit], ids=["tiff", "png"])
def test_a_16_bit_colour_picture_is_turned_as_its_orientation_says_once(write, orientation):
    """OpenCV turns a TIFF by its tag itself: turned again, a 90° picture came out at 270°."""
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    picture = validate_upload(SimpleUploadedFile("cell", write(np.asarray(cell).astype(np.uint16) * 16, orientation)))
    as_shown = ImageOps.exif_transpose(_with_orientation(cell, orientation))
    kept = np.asarray(Image.open(picture.picture_png)).astype(int)
    assert kept.shape[:2] == np.asarray(as_shown).shape[:2] and np.abs(kept - np.asarray(as_shown)).max() <= 1


def test_a_16_bit_tiff_with_its_colours_in_separate_planes_is_refused_not_misread(api_client):
    """Pillow reads such planes as 8-bit bands, OpenCV mixes them: what was kept, and classified,
    was a striped picture, not the cell."""
    cell = np.asarray(Image.open(fixture_cells()[0]).convert("RGB")).astype(np.uint16) * 257
    response = api_client.post(
        "/api/analyses/",
        {"image": upload("cell.tif", tiff_16_bit(cell, planar=True), "image/tiff")},
        format="multipart",
    )
    assert response.status_code == 400, response.content
    assert "cell.tif: this TIFF keeps its 16-bit colours in separate planes" in response.json()["detail"]
    assert not Analysis.objects.exists()
    interleaved = validate_upload(SimpleUploadedFile("cell.tif", tiff_16_bit(cell)))  # the usual layout is read
    assert np.abs(np.asarray(Image.open(interleaved.picture_png)).astype(int) - cell // 257).max() <= 1


def _with_orientation(picture: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_16_bit_bitmaps_of_five_and_six_bits_a_colour_are_read_as_before(user):
    """A BMP's 16-bit pixels are 5-6-5 bits: no 16-bit colour to read again."""
    cell = Image.open(fixture_cells()[0]).convert("RGB").resize((64, 60))
    rgb = np.asarray(cell).astype(np.uint16)
    pixels = ((rgb[..., 0] >> 3) << 11 | (rgb[..., 1] >> 2) << 5 | rgb[..., 2] >> 3).astype("<u2")
    rows = b"".join(pixels[y].tobytes() for y in range(pixels.shape[0] - 1, -1, -1))  # bottom-up
    header = struct.pack("<IiiHHIIiiII", 40, 64, 60, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    offset = 14 + len(header) + len(masks)
    bmp = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + masks + rows
    assert Image.open(io.BytesIO(bmp)).tile[0].args[0] == "BGR;16"
    analysis = services.create_analysis(owner=user, upload=upload("565.bmp", bmp))
    kept = np.asarray(Image.open(analysis.image.path).convert("RGB")).astype(int)
    assert np.abs(kept - np.asarray(cell).astype(int)).max() <= 8  # 5 and 6 bits a channel


def test_no_text_of_the_file_is_kept_with_its_picture_an_icc_profile_neither(user):
    cell = Image.open(fixture_cells()[0]).convert("RGB")
    buffer = io.BytesIO()
    cell.save(buffer, format="JPEG", icc_profile=b"\0" * 128 + b"Patient: Jane Doe, ward 7", quality=95)
    analysis = services.create_analysis(owner=user, upload=upload("cell.jpg", buffer.getvalue()))
    for kept in (analysis.image, analysis.thumbnail):
        stored = kept.open("rb").read()
        assert b"Jane Doe" not in stored and "icc_profile" not in Image.open(io.BytesIO(stored)).info


@pytest.mark.parametrize("extra", [0, 1, 2], ids=["unspecified", "associated-alpha", "alpha"])
def test_a_16_bit_tiff_with_a_fourth_sample_is_read_at_its_depth(extra):
    """Pillow names these RGBX;16 and RGBa;16: read at 8 bits, 12-bit data was a black picture."""
    cell = np.asarray(Image.open(fixture_cells()[0]).convert("RGB")).astype(np.uint16) * 16
    four = np.dstack([cell, np.full(cell.shape[:2], 4095, np.uint16)])
    data = tiff_16_bit(four, extra_sample=extra)
    kept = np.asarray(Image.open(validate_upload(SimpleUploadedFile("c.tif", data)).picture_png)).astype(int)
    assert abs(kept.mean() - (cell / 16).mean()) < 2


def test_twelve_bit_colour_in_a_16_bit_file_is_kept_as_bright_as_the_camera_took_it(user):
    """Pillow keeps only the high byte of 16-bit colour: 0..4095 read as 0..15, a black picture."""
    cell = np.asarray(Image.open(fixture_cells()[0]).convert("RGB"))
    for extension in (".png", ".tif"):
        deep = cv2.imencode(extension, (cell.astype(np.uint16) * 16)[..., ::-1])[1].tobytes()
        analysis = services.create_analysis(owner=user, upload=upload(f"cell{extension}", deep))
        kept = np.asarray(Image.open(analysis.image.path).convert("RGB")).astype(int)
        assert np.abs(kept - cell).max() <= 1, extension


def test_a_loose_crop_refusal_never_says_the_cell_spans_the_share_it_needs(api_client):
    """The share was rounded to the nearest percent: a cell spanning 59.7% was refused with "the cell
    spans 60% of the picture's long side ... (at least 60%)"."""
    picture = Image.new("RGB", (1000, 597))
    ImageDraw.Draw(picture).ellipse([400, 0, 799, 596], fill=(180, 90, 120))  # standing the full height
    answer = api_client.post("/api/analyses/", {"image": upload("tall.png", _encoded(picture, "PNG"))})
    assert answer.status_code == 400 and "the cell spans 59% of the picture's long side" in str(answer.json())


def test_an_upload_form_sent_again_while_its_first_send_is_checked_stores_one_batch(
    web_client, monkeypatch, media_root
):
    """The session learns of an upload only once it is stored: a second click without JavaScript,
    arriving while the first send's images were still being checked, stored the patient's cells twice."""
    before = set(stored_files(media_root))
    page = web_client.get("/upload/").content.decode()
    sent = {
        "images": [upload("a.png"), upload("b.png")],
        "sample_reference": "WARD-7",
        "upload_id": re.search(r'name="upload_id" value="([^"]+)"', page)[1],
    }
    second_click = Client()
    second_click.cookies = web_client.cookies  # the same browser
    check_images = services._validate_all
    answers = []

    def second_click_meanwhile(uploads):
        if not answers:
            answers.append("sending")
            answers[0] = second_click.post("/upload/", sent | {"images": [upload("a.png"), upload("b.png")]})
        return check_images(uploads)

    monkeypatch.setattr(services, "_validate_all", second_click_meanwhile)
    first = web_client.post("/upload/", sent, follow=True)
    assert answers[0].status_code == 302 and Batch.objects.count() == 1 and Analysis.objects.count() == 2
    assert first.redirect_chain[-1][0] == f"/batches/{Batch.objects.get().pk}/"
    assert "nothing was stored twice" in first.content.decode()
    kept = {Path(settings.MEDIA_ROOT, f.name) for a in Analysis.objects.all() for f in (a.image, a.thumbnail)}
    assert set(stored_files(media_root)) - before == kept  # the first send's copies are gone


def test_an_upload_sent_after_the_session_ended_says_nothing_was_stored(client, user):
    """Without JavaScript the upload went to the sign-in page and on to an empty upload form, neither
    saying whether the patient's images had been stored."""
    response = client.post("/upload/", {"images": [upload("a.png")], "sample_reference": "WARD-7"})
    assert response.status_code == 302 and response.url == "/accounts/login/?next=/upload/"
    login_page = client.get(response.url).content.decode()
    assert "Your session had ended, so nothing was stored: sign in, then choose the images again." in login_page
    assert not Batch.objects.exists()


def test_file_names_over_255_characters_keep_their_numbered_end(web_client, api_client):
    """Django cut names over 255 characters at their end, keeping only the extension, before they were
    shortened in the middle: two cells of one batch showed the very same name."""
    stem = "C100P61ThinF_IMG_20150918_144104_" + "x" * 240

    def named(n: int) -> io.BytesIO:  # a SimpleUploadedFile would cut the name itself, before it is sent
        file = io.BytesIO(image_bytes())
        file.name = f"{stem}_cell_{n}.png"
        return file

    assert web_client.post("/upload/", {"images": [named(1), named(2)]}).status_code == 302
    assert api_client.post("/api/batches/", {"images": [named(3)]}, format="multipart").status_code == 202
    names = list(Analysis.objects.order_by("pk").values_list("original_filename", flat=True))
    assert [name[-11:] for name in names] == ["_cell_1.png", "_cell_2.png", "_cell_3.png"]
    assert all(name.startswith("C100P61ThinF_IMG_") and len(name) == 200 for name in names)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _large_photo() -> bytes:
    """A cell photographed large: its picture's PNG is past the 1 MB validation keeps in memory, and
    the upload under the 2 MB past which Django spools the request itself."""
    cell = Image.open(fixture_cells()[0]).convert("RGB").resize((1200, 1200), Image.BICUBIC)
    grain = np.random.default_rng(0).integers(-4, 5, (1200, 1200, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(cell).astype(np.int16) + grain, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    assert 1024 * 1024 < buffer.tell() < 2 * 1024 * 1024
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["storing", "spooling a large picture"])
@pytest.mark.parametrize("channel", ["api", "upload.js", "form"])
def test_an_upload_onto_a_full_disk_says_so_and_stores_nothing(
    api_client, web_client, media_root, monkeypatch, channel, where
):
    """A bare 500: the API said "The server failed", so a lab system retried and nobody learnt the
    storage was full, and the upload page said the upload "may have been stored", which it was not.
    A picture past 1 MB, spooled to disk while it is checked, was a 500 still."""
    before = set(stored_files(media_root))
    if where == "storing":
        monkeypatch.setattr(private_storage, "_save", _disk_full)
        images = {"images": [upload("a.png"), upload("b.png")]}
    else:
        images = {"images": [upload("a.png"), upload("large.png", _large_photo())]}
        monkeypatch.setattr(tempfile, "TemporaryFile", _disk_full)  # where a spool rolls over to disk
    if channel == "api":
        answer = api_client.post("/api/batches/", images, format="multipart")
        told = answer.json()["detail"]
    elif channel == "upload.js":
        answer = web_client.post("/upload/", images, headers={"X-Requested-With": "XMLHttpRequest"})
        told = answer.json()["detail"]
    else:
        answer = web_client.post("/upload/", images)
        told = html.unescape(answer.content.decode())
    assert answer.status_code == (400 if channel == "form" else 507)
    assert "The server could not store the images (No space left on device): tell the lab's IT" in told
    assert not Analysis.objects.exists() and set(stored_files(media_root)) == before
