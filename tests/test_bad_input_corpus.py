"""A corpus of hostile, broken and odd files through the API and the web form.

Every file must end as either a 4xx with a message (nothing stored) or, for odd but valid images,
an analysis the model completes. Prints the tally (run with -s).
"""

import io
from collections import Counter

import cv2
import numpy as np
import pytest
from django.test import Client
from django.utils.html import escape
from PIL import Image
from rest_framework.test import APIClient

from diagnosis import inference
from diagnosis.models import Analysis
from tests.conftest import fixture_cells, stored_files
from tests.factories import PASSWORD
from tests.test_uploads import bomb_png, png_header_only

CELL = fixture_cells()[0].read_bytes()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def cell(mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(CELL)).convert(mode)


def exif_rotated_jpeg() -> bytes:
    wide = cell().resize((120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(wide, "JPEG", exif=exif.tobytes())


def deep_colour(extension: str) -> bytes:
    twelve_bit = np.asarray(cell()).astype(np.uint16) * 16
    return cv2.imencode(extension, twelve_bit[..., ::-1])[1].tobytes()


def animated_gif() -> bytes:
    frames = [cell("P"), cell("P").rotate(90)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


REJECT, ACCEPT = "reject", "accept"
CORPUS = {
    "zero-bytes.png": (b"", REJECT),
    "text.png": (b"hello, not an image", REJECT),
    "truncated.png": (CELL[: len(CELL) // 2], REJECT),
    "corrupt-crc.png": (CELL[:40] + bytes(b ^ 0xFF for b in CELL[40:80]) + CELL[80:], REJECT),
    "truncated.jpg": (encode(cell(), "JPEG")[:300], REJECT),
    "corrupt.jpg": (b"\xff\xd8\xff\xe0" + b"\x00" * 200, REJECT),
    "header-only-1x1.png": (png_header_only(1, 1), REJECT),
    "header-20000x20000.png": (png_header_only(20000, 20000), REJECT),
    "bomb.png": (bomb_png(), REJECT),
    "tiny-1x1.png": (encode(Image.new("RGB", (1, 1)), "PNG"), REJECT),
    "svg-with-script.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', REJECT),
    "svg-renamed.png": (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', REJECT),
    "html-renamed.png": (b"<!doctype html><html><script>alert(document.cookie)</script></html>", REJECT),
    "png-magic-then-html.png": (b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>", REJECT),
    "animated.gif": (animated_gif(), REJECT),
    "static.gif": (encode(cell("P"), "GIF"), REJECT),
    "webp.webp": (encode(cell(), "WEBP"), REJECT),
    "pdf.png": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", REJECT),
    "zip.png": (b"PK\x03\x04" + b"\x00" * 100, REJECT),
    "exif-rotated.jpg": (exif_rotated_jpeg(), ACCEPT),
    # A 12-bit camera's colour in a 16-bit file (Pillow alone reads it as a black picture).
    "12-bit-colour-in-16.png": (deep_colour(".png"), ACCEPT),
    "12-bit-colour-in-16.tif": (deep_colour(".tif"), ACCEPT),
    "palette.png": (encode(cell("P"), "PNG"), ACCEPT),
    "rgba.png": (encode(cell("RGBA"), "PNG"), ACCEPT),
    # Grey pictures, in which the model misses parasites: refused, not reported as negatives.
    "grayscale.png": (encode(cell("L"), "PNG"), REJECT),
    "16-bit-grey.png": (encode(Image.fromarray(np.asarray(cell("L")).astype(np.uint16) * 257), "PNG"), REJECT),
    "grey-palette.png": (encode(cell("L").convert("P"), "PNG"), REJECT),
    "bilevel.tif": (encode(cell("1"), "TIFF"), REJECT),
    "cmyk.jpg": (encode(cell("CMYK"), "JPEG"), ACCEPT),
    "polyglot-png-with-html-tail.png": (CELL + b"<html><script>alert(1)</script></html>", ACCEPT),
    "../../../../etc/passwd.png": (CELL, ACCEPT),
    "..\\..\\windows\\system.ini.png": (CELL, ACCEPT),
    "细胞 ünïcødé ✓.png": (CELL, ACCEPT),
    "name-with-<script>.png": (CELL, ACCEPT),
    "tiff.tif": (encode(cell(), "TIFF"), ACCEPT),
    "multi-page.tif": (encode(cell(), "TIFF", save_all=True, append_images=[cell().rotate(90)]), REJECT),
    # A phone JPEG carrying a second picture (preview or gain map): Pillow reads it as MPO.
    "phone-mpo.jpg": (encode(cell(), "MPO", save_all=True, append_images=[cell().resize((40, 40))]), ACCEPT),
    "bitmap.bmp": (encode(cell(), "BMP"), ACCEPT),
    # Pictures of no cell, which the model would call Uninfected with confidence.
    "blank-white.png": (encode(Image.new("RGB", (400, 400), (255, 255, 255)), "PNG"), REJECT),
    "fully-transparent.png": (encode(Image.new("RGBA", (100, 100), (0, 0, 0, 0)), "PNG"), REJECT),
    "strip-16x3000.png": (encode(cell().resize((16, 3000)), "PNG"), REJECT),
}


def via_api(user, name, content):
    api = APIClient()
    api.force_authenticate(user)
    return api.post("/api/analyses/", {"image": _file(name, content)})


def via_web(user, name, content):
    web = Client()
    web.login(username=user.username, password=PASSWORD)
    return web.post("/upload/", {"images": [_file(name, content)]})


def _file(name: str, content: bytes):
    handle = io.BytesIO(content)
    handle.name = name
    return handle


def test_corpus_through_api_and_web_form(user, media_root, settings, capsys):
    assert len(CORPUS) >= 25
    tally: Counter = Counter()
    for channel, send, accepted_codes in (("api", via_api, {202}), ("web", via_web, {302})):
        for name, (content, expected) in CORPUS.items():
            before_rows, before_files = Analysis.objects.count(), set(stored_files(media_root))
            response = send(user, name, content)
            assert response.status_code < 500, (channel, name, response.status_code)
            if expected == REJECT:
                assert 400 <= response.status_code < 500, (channel, name, response.status_code)
                body = response.content.decode(errors="replace")
                # The refusal says which file (the API takes one, under `image`) and why.
                if channel == "web":
                    assert escape(name) in body, (channel, name, body[:300])
                else:
                    detail = response.json()["detail"]
                    assert detail.startswith((f"{name}: ", "image: ")) and len(detail) > 20, (name, detail)
                assert Analysis.objects.count() == before_rows, (channel, name)
                assert set(stored_files(media_root)) == before_files, (channel, name)
                tally[f"{channel} rejected with a message"] += 1
            else:
                assert response.status_code in accepted_codes, (channel, name, response.content[:300])
                tally[f"{channel} accepted"] += 1

    accepted = list(Analysis.objects.order_by("pk"))
    inference.run_analyses(analysis_ids=[a.pk for a in accepted], task_id="corpus")
    for analysis in Analysis.objects.filter(pk__in=[a.pk for a in accepted]):
        assert analysis.status == "done", (analysis.original_filename, analysis.error)
        overlay = Image.open(analysis.overlay.path)
        assert overlay.size == (analysis.width, analysis.height)
        assert "/" not in analysis.original_filename and "\\" not in analysis.original_filename
        tally["analysed to done"] += 1
    rotated = Analysis.objects.filter(original_filename="exif-rotated.jpg").first()
    assert (rotated.width, rotated.height) == (60, 120)  # EXIF orientation applied

    with capsys.disabled():
        print(f"\n[bad-input corpus] {len(CORPUS)} files x 2 channels: {dict(tally)}; 0 server errors, 0 orphans")


def test_huge_multipart_request_is_refused_before_it_is_read(user, settings):
    settings.REQUEST_MAX_BYTES = 1024 * 1024
    response = via_api(user, "huge.png", CELL + b"\x00" * (2 * 1024 * 1024))
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    assert Analysis.objects.count() == 0


@pytest.mark.parametrize("name", ["page.html", "image.svg"])
def test_stored_files_are_never_served_as_markup(user, name):
    response = via_api(user, name, CELL)  # a real PNG under a markup name
    assert response.status_code == 202
    analysis = Analysis.objects.get()
    assert analysis.image.name.endswith(".png")  # the stored name comes from the decoded format
    web = Client()
    web.login(username=user.username, password=PASSWORD)
    download = web.get(f"/analyses/{analysis.pk}/image/")
    assert download["Content-Type"] == "image/png"
