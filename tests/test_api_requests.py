"""Requests a lab system's HTTP library may send as it is: none may get a 500, lose a part unseen,
or be answered in a form or with a message that misleads."""

import pytest
from django.core.files.uploadhandler import FileUploadHandler
from rest_framework.test import APIClient

from diagnosis import services
from diagnosis.models import Analysis, Batch
from diagnosis.services import create_batch
from tests.factories import PASSWORD, api_key, image_bytes, upload

PNG = image_bytes()


# As long as the ones HTTP libraries make, so that a delimiter often straddles two reads of the body.
BOUNDARY = b"----LabSystemFormBoundary7MA4YWxkTrZu0gW1c2f"


def _multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """Parts as (raw header lines, body)."""
    opening = b"--" + BOUNDARY + b"\r\n"
    return (
        b"".join(opening + headers + b"\r\n\r\n" + body + b"\r\n" for headers, body in parts)
        + b"--"
        + BOUNDARY
        + b"--\r\n"
    )


def _image(name: bytes = b"a.png", field: bytes = b"images") -> tuple[bytes, bytes]:
    return (
        b'Content-Disposition: form-data; name="' + field + b'"; filename="' + name + b'"\r\nContent-Type: image/png',
        PNG,
    )


def _post(lab, path, parts, **extra):
    return lab.generic(
        "POST", path, _multipart(parts), content_type=f"multipart/form-data; boundary={BOUNDARY.decode()}", **extra
    )


@pytest.mark.parametrize("url", ["https://[lis01/results", "https://lis01]/results"])
def test_a_callback_url_with_a_stray_bracket_is_refused_not_a_500(lab, settings, url):
    """urlsplit raises ValueError("Invalid IPv6 URL"), which check_callback_url lets through: a 500."""
    settings.CALLBACK_ALLOWED_HOSTS = ["lis01"]
    field = (b'Content-Disposition: form-data; name="callback_url"', url.encode())
    lab.raise_request_exception = False
    refused = _post(lab, "/api/batches/", [_image(), field])
    assert refused.status_code == 400, refused.content
    assert "callback_url" in refused.json()["detail"]
    assert not Batch.objects.exists()


UNREADABLE_PARTS = {
    # A Windows lab system's file name in its own code page (cp1252/latin-1), not UTF-8: Django
    # cannot decode the part's header line, skips the header, and then the whole part.
    "latin-1-file-name": (b'Content-Disposition: form-data; name="images"; filename="cellule-\xe9.png"', PNG),
    "no-name": (b'Content-Disposition: form-data; filename="b.png"\r\nContent-Type: image/png', PNG),
    "no-disposition": (b"Content-Type: image/png", PNG),
}


@pytest.mark.parametrize("part", UNREADABLE_PARTS.values(), ids=UNREADABLE_PARTS.keys())
def test_a_part_django_cannot_read_is_refused_not_dropped_from_the_batch(lab, user, part, monkeypatch):
    """The batch was stored (202) with one cell of the two images sent."""
    # Read in small pieces, as a large batch is: the delimiters between parts straddle the reads.
    monkeypatch.setattr(FileUploadHandler, "chunk_size", 97)
    answer = _post(lab, "/api/batches/", [*(_image(f"cell-{n}.png".encode()) for n in range(6)), part])
    assert answer.status_code == 400, answer.content
    assert "A part of the form could not be read" in answer.json()["detail"]
    assert not Analysis.objects.exists()
    assert _post(lab, "/api/batches/", [_image(f"cell-{n}.png".encode()) for n in range(12)]).status_code == 202
    assert Analysis.objects.count() == 12


def test_a_single_image_with_a_latin1_file_name_is_not_told_no_file_was_sent(lab, user):
    """The image was sent; the answer said "image: No file was submitted."."""
    answer = _post(lab, "/api/analyses/", [_image(b"cellule-\xe9.png", field=b"image")])
    assert answer.status_code == 400 and "send file names as UTF-8" in answer.json()["detail"]
    assert _post(lab, "/api/analyses/", [_image("cellule-é.png".encode(), field=b"image")]).status_code == 202


def test_a_sample_reference_that_is_not_utf8_is_refused_not_stored_garbled(lab, user):
    """A latin-1 "WARD-É" was stored as "WARD-\\ufffd": the patient's reference changed, unseen,
    and ?sample_reference=WARD-É no longer finds it."""
    reference = (b'Content-Disposition: form-data; name="sample_reference"', "WARD-É".encode("latin-1"))
    answer = _post(lab, "/api/batches/", [_image(), reference])
    assert answer.status_code == 400 and "The field sample_reference is not UTF-8 text" in answer.json()["detail"]
    assert not Batch.objects.exists()


# java.net.HttpURLConnection's default Accept, sent by every Java client that sets none.
JAVA_ACCEPT = "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2"


def test_a_java_clients_default_accept_header_gets_json_not_the_browsable_api(lab, user):
    """The API "speaks JSON only" (api/urls.py), but text/html picks DRF's browsable HTML page:
    a Java lab system's batch POST was stored (202) and answered with HTML it cannot parse."""
    listed = lab.get("/api/analyses/", HTTP_ACCEPT=JAVA_ACCEPT)
    assert listed["Content-Type"] == "application/json", listed["Content-Type"]
    stored = _post(lab, "/api/batches/", [_image()], HTTP_ACCEPT=JAVA_ACCEPT)
    assert stored.status_code == 202 and stored["Content-Type"] == "application/json"
    issued = APIClient().post(
        "/api/auth/token/", {"username": user.username, "password": PASSWORD}, HTTP_ACCEPT=JAVA_ACCEPT
    )
    assert issued["Content-Type"] == "application/json", issued["Content-Type"]


def test_a_bearer_token_is_told_the_scheme_to_use(user):
    """ "Bearer <key>" (the usual OAuth form) got "Authentication credentials were not provided.":
    the integrator sent them, and is not told that the API wants "Token <key>"."""
    refused = APIClient(HTTP_AUTHORIZATION=f"Bearer {api_key(user)}").get("/api/analyses/")
    assert refused.status_code == 401
    assert refused.json()["detail"] == "This API takes its key as 'Authorization: Token <key>', not 'Bearer <key>'."


def test_options_describes_the_upload_fields_a_post_takes(lab, user):
    """OPTIONS lists, as what POST takes, the fields of the answer (id, status, ... all read-only)
    and not `images`, `sample_reference`, `note` or `callback_url`."""
    described = lab.options("/api/batches/").json()["actions"]["POST"]
    assert {"images", "sample_reference", "callback_url"} <= set(described), sorted(described)
    assert "id" not in described
    assert set(lab.options("/api/analyses/").json()["actions"]["POST"]) == {"image"}
    batch = services.create_batch(owner=user, uploads=[upload("a.png")])
    for action in ("retry-failed", "callback/retry"):  # they take no body
        assert lab.options(f"/api/batches/{batch.pk}/{action}/").json()["actions"]["POST"] == {}
    cell = batch.analyses.get()
    assert lab.options(f"/api/analyses/{cell.pk}/retry/").json()["actions"]["POST"] == {}


def test_drfs_format_override_is_not_answered_as_a_missing_record(lab, user):
    """?format=xml on a batch that exists answered 404 "Not found." (the schema's 404: "no such
    record"); ?format=json, which the upload POSTs take as DRF's own, is refused on the lists."""
    batch = services.create_batch(owner=user, uploads=[upload("a.png")])
    odd = lab.get(f"/api/batches/{batch.pk}/?format=xml")
    assert (
        odd.status_code == 406 and odd.json()["detail"] == "There is no answer in the format 'xml': leave ?format out."
    )
    assert lab.get("/api/analyses/?format=json").status_code == 200
    assert lab.get(f"/api/batches/{batch.pk}/?format=json").json()["id"] == batch.pk


def test_the_schema_lists_406_where_the_api_answers_it(lab, user, client):
    paths = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()["paths"]
    assert "406" in paths["/api/batches/"]["get"]["responses"]
    assert "406" not in paths["/api/analyses/{id}/{kind}/"]["get"]["responses"]  # a file goes out anyway
    refused = lab.get("/api/batches/", HTTP_ACCEPT="image/png")
    assert refused.status_code == 406 and refused["Content-Type"] == "application/json"


@pytest.mark.parametrize("cut", ["before-the-closing-delimiter", "inside-the-last-image"])
def test_a_body_that_never_closes_is_refused_not_stored_without_its_last_image(lab, user, cut, monkeypatch):
    """Django finishes a file at the delimiter after it: a body cut short, or never closed with
    --boundary--, was stored (202) with every image but the last."""
    monkeypatch.setattr(FileUploadHandler, "chunk_size", 97)  # the closing delimiter straddles reads too
    body = _multipart([_image(b"a.png"), _image(b"b.png"), _image(b"c.png")])
    whole = lab.generic(
        "POST", "/api/batches/", body, content_type=f"multipart/form-data; boundary={BOUNDARY.decode()}"
    )
    assert whole.status_code == 202 and Analysis.objects.count() == 3
    body = body[: body.rindex(b"\r\n--" + BOUNDARY + b"--")]
    if cut == "inside-the-last-image":
        body = body[:-200]
    answer = lab.generic(
        "POST", "/api/batches/", body, content_type=f"multipart/form-data; boundary={BOUNDARY.decode()}"
    )
    assert answer.status_code == 400 and "ends before the form's closing boundary" in answer.json()["detail"]
    assert Analysis.objects.count() == 3


@pytest.mark.parametrize("path", ["/api/analyses/", "/api/batches/"])
def test_the_schema_lists_the_507_an_upload_onto_a_full_disk_gets(client, path):
    import yaml

    document = yaml.safe_load(client.get("/api/schema/").content)
    assert "507" in document["paths"][path]["post"]["responses"]


def test_a_filter_of_nothing_but_an_invisible_character_is_empty(api_client, user):
    """`?sample_reference=` of a zero-width space passed the empty check (strip keeps it), then read
    as nothing: the API listed every batch of the account, the unfiltered list it promises never to give."""
    create_batch(owner=user, uploads=[upload("a.png")], sample_reference="WARD-7")
    answer = api_client.get("/api/batches/", {"sample_reference": "\u200b"})
    assert answer.status_code == 400 and answer.json()["detail"].startswith("sample_reference is empty")
