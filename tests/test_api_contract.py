"""What a lab system's client relies on: the schema says what the API really answers, paths work with
or without their slash, files download whatever they are asked for as, and a misspelt filter is
refused rather than ignored into every cell of the account."""

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from django.test import Client
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from diagnosis import services
from diagnosis.models import Analysis
from malaria_site.wsgi import application
from tests.factories import api_key, classified, upload

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
AS_DOCUMENTED = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def token(user):
    # As in test_api_fuzz: calling the WSGI app directly would close the test's database connection.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield api_key(user)
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


def test_every_kind_of_record_is_answered_as_the_schema_says(user, token, settings):
    settings.CALLBACK_ALLOWED_HOSTS = ["lis01"]
    batch = services.create_batch(
        owner=user, uploads=[upload("done.png"), upload("queued.png")], callback_url="https://lis01/in"
    )
    finished = classified(batch.analyses.get(original_filename="done.png"))
    services.review_analysis(analysis=finished, reviewer=user, verdict="agree", replacing=None)
    single = services.create_analysis(owner=user, upload=upload("single.png"))  # no batch; no label yet
    Analysis.objects.filter(pk=single.pk).update(status="failed", error="Model unavailable")
    calls = [
        ("/api/analyses/", {}, {"status": "failed"}),
        ("/api/analyses/{id}/", {"id": single.pk}, {}),
        ("/api/analyses/{id}/", {"id": finished.pk}, {}),
        ("/api/analyses/{id}/{kind}/", {"id": finished.pk, "kind": "overlay"}, {}),  # none yet: 404
        ("/api/analyses/{id}/{kind}/", {"id": single.pk, "kind": "image"}, {}),
        ("/api/analyses/{id}/", {"id": 10**6}, {}),
        ("/api/batches/", {}, {}),
        ("/api/batches/{id}/", {"id": batch.pk}, {}),
    ]
    for path, path_parameters, query in calls:
        case = schema[path]["GET"].Case(path_parameters=path_parameters, query=query)
        response = case.call(headers={"Authorization": f"Token {token}"})
        case.validate_response(response, checks=AS_DOCUMENTED)
    unfiltered = APIClient(HTTP_AUTHORIZATION=f"Token {token}").get("/api/analyses/").json()
    assert {row["batch"] for row in unfiltered["results"]} == {batch.pk, None}
    assert {row["label"] for row in unfiltered["results"]} == {"Parasitized", ""}


def test_a_path_without_its_slash_is_served_not_redirected(lab, user, media_root):
    # A redirect would be followed as a GET: the lab system would see 200 and nothing stored.
    created = lab.post("/api/batches", {"images": [upload("a.png")], "sample_reference": "S-1"})
    assert created.status_code == 202 and created.json()["sample_reference"] == "S-1"
    batch_id = created.json()["id"]
    assert lab.get(f"/api/batches/{batch_id}").json()["id"] == batch_id
    assert lab.get("/api/analyses").json()["count"] == 1
    assert lab.delete(f"/api/batches/{batch_id}").status_code == 204
    assert not user.batches.exists()


def test_files_download_whatever_type_the_client_asks_for(lab, user, other_user):
    cell = classified(services.create_analysis(owner=user, upload=upload("a.png")))
    for accept in ("image/png", "image/*", "application/octet-stream", "*/*"):
        response = lab.get(f"/api/analyses/{cell.pk}/image/", HTTP_ACCEPT=accept)
        assert response.status_code == 200 and response["Content-Type"] == "image/png", accept
    theirs = services.create_analysis(owner=other_user, upload=upload("b.png"))
    refused = lab.get(f"/api/analyses/{theirs.pk}/image/", HTTP_ACCEPT="image/png")
    assert refused.status_code == 404 and refused.json()["detail"]


def test_a_misspelt_filter_is_refused_and_the_batch_filter_works(lab, user):
    batch = services.create_batch(owner=user, uploads=[upload("in.png")])
    services.create_analysis(owner=user, upload=upload("out.png"))
    for path in ("/api/analyses/?batch_id=1", "/api/analyses/?sample_reference=S", "/api/batches/?reference=S"):
        refused = lab.get(path)
        assert refused.status_code == 400 and "Unknown query parameter" in refused.json()["detail"], path
    names = [row["original_filename"] for row in lab.get(f"/api/analyses/?batch={batch.pk}").json()["results"]]
    assert names == ["in.png"]
    assert lab.get("/api/analyses/?batch=x").status_code == 400
    assert lab.get(f"/api/analyses/?batch={2**63}").status_code == 400  # past any id: a 500 on SQLite
    assert lab.get(f"/api/analyses/?batch={2**63 - 1}").status_code == 404  # no such batch
    assert lab.get("/api/analyses/?page=1").status_code == 200


def test_the_batch_filter_of_another_users_batch_is_a_404_as_for_none(lab, user, other_user):
    """?batch= of another user's batch, or of none, answered 200 with an empty list, so a lab system
    with a mistyped id was told the batch had no cells; the owner's batch (even emptied) lists."""
    mine = services.create_batch(owner=user, uploads=[upload("mine.png")])
    emptied = services.create_batch(owner=user, uploads=[upload("gone.png")])
    services.delete_analysis(analysis=emptied.analyses.get())
    theirs = services.create_batch(owner=other_user, uploads=[upload("theirs.png")])
    outsider = APIClient()
    outsider.force_authenticate(other_user)
    names = [row["original_filename"] for row in lab.get(f"/api/analyses/?batch={mine.pk}").json()["results"]]
    assert names == ["mine.png"]
    assert lab.get(f"/api/analyses/?batch={emptied.pk}").json()["results"] == []
    refusals = {
        "theirs": lab.get(f"/api/analyses/?batch={theirs.pk}"),
        "mine, to another user": outsider.get(f"/api/analyses/?batch={mine.pk}"),
        "none": lab.get(f"/api/analyses/?batch={theirs.pk + 1000}"),
    }
    for case, refused in refusals.items():
        assert refused.status_code == 404, case
        assert refused.json()["detail"].startswith("No batch #"), case
    assert refusals["theirs"].json()["detail"] == refusals["none"].json()["detail"].replace(
        str(theirs.pk + 1000), str(theirs.pk)
    )  # the same words: nothing tells another user's batch from a missing one
    not_a_number = lab.get("/api/analyses/?batch=x")
    assert not_a_number.status_code == 400 and "batch" in not_a_number.json()["detail"]


def test_a_cells_own_url_finds_it_whatever_the_lists_filters_say(lab, user):
    cell = classified(services.create_analysis(owner=user, upload=upload("a.png")))
    assert lab.get(f"/api/analyses/{cell.pk}/?status=failed").status_code == 200
    assert lab.get(f"/api/analyses/{cell.pk}/?label=bogus").status_code == 200
    assert lab.delete(f"/api/analyses/{cell.pk}/?status=queued").status_code == 204


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_unknown_api_paths_and_errors_are_json_and_site_pages_html(lab, client, settings, debug):
    settings.DEBUG = debug  # scripts/start runs with DEBUG on, where Django answers its HTML debug page
    for path in ("/api/nothing/", "/api/nothing", "/api/analyses/abc/", "/api/batches/1/thumbnail/", "/api//batches/"):
        missing = lab.get(path)
        assert missing.status_code == 404 and missing["Content-Type"] == "application/json", path
        assert "/api/docs/" in missing.json()["detail"]
    assert "text/html" in client.get("/no-such-page/")["Content-Type"]


def test_an_upload_field_the_api_would_drop_is_refused_and_nothing_is_stored(lab, user):
    """A misspelt field, one sent in the query string or twice, or a file under a name the POST does
    not take was dropped unseen: a batch stored without its patient's reference or callback, or a file."""
    refusals = {
        "/api/batches/": [
            ({"images": [upload("a.png")], "sample_ref": "WARD-7"}, "", "Unknown field: sample_ref"),
            ({"images": [upload("a.png")], "callbackurl": "https://lis/x"}, "", "Unknown field: callbackurl"),
            ({"images": [upload("a.png")], "image": upload("b.png")}, "", "Unknown field: image"),
            ({"images": [upload("a.png")]}, "?sample_reference=WARD-7", "takes no query parameters"),
            ({"images": [upload("a.png")], "sample_reference": ["W-1", "W-2"]}, "", "sample_reference was sent"),
        ],
        "/api/analyses/": [
            ({"image": [upload("a.png"), upload("b.png")]}, "", "The field image was sent more than once"),
            ({"image": upload("a.png"), "sample_reference": "WARD-7"}, "", "Unknown field: sample_reference"),
        ],
    }
    for path, cases in refusals.items():
        for body, query, message in cases:
            refused = lab.post(path + query, body)
            assert refused.status_code == 400 and message in refused.json()["detail"], (path, body, refused.json())
    assert not Analysis.objects.exists()
    taken = lab.post("/api/batches/", {"images": [upload("a.png"), upload("b.png")], "sample_reference": "W-1"})
    assert taken.status_code == 202 and len(taken.json()["analyses"]) == 2


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    return (
        b"".join(
            (
                f'--B\r\nContent-Disposition: form-data; name="{name}"'
                + ("" if filename is None else f'; filename="{filename}"')
                + "\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
            for name, filename, content in parts
        )
        + b"--B--\r\n"
    )


UPLOADS = [("/api/batches/", "images"), ("/api/analyses/", "image")]


@pytest.mark.parametrize(("path", "field"), UPLOADS)
@pytest.mark.parametrize(
    ("filename", "content"), [("", b""), ("", b"PNG bytes"), (None, b"a.png")], ids=["empty", "empty-name", "no-name"]
)
def test_a_file_part_with_no_file_in_it_is_refused_as_such(lab, user, path, field, filename, content):
    """A form's empty file field (a part with an empty file name) was refused as images[0], "not a
    file": the first image named, whichever part was empty."""
    parts = [(field, "a.png", upload("a.png").read())] if field == "images" else []
    body = _multipart([*parts, (field, filename, content)])
    refused = lab.generic("POST", path, body, content_type="multipart/form-data; boundary=B")
    assert refused.status_code == 400, refused.content
    assert refused.json()["detail"] == (
        f"A part named {field} is not a file (its file name is empty or missing): choose one or leave it out."
    )
    assert not Analysis.objects.exists()


@pytest.mark.parametrize(("path", "field"), UPLOADS)
@pytest.mark.parametrize("filename", [".", "..", "scans/", "C:\\scans\\"])
def test_a_file_part_named_by_no_file_name_is_refused_not_dropped(lab, user, path, field, filename):
    """Django drops a file part whose name is nothing once its folders are cleaned off: the batch
    was taken (202) without that image."""
    body = _multipart([(field, "a.png", upload("a.png").read()), (field, filename, upload("b.png").read())])
    refused = lab.generic("POST", path, body, content_type="multipart/form-data; boundary=B")
    assert refused.status_code == 400, refused.content
    assert "has no file name in it: name each file" in refused.json()["detail"]
    assert not Analysis.objects.exists()


@pytest.mark.parametrize(("path", "field"), [("/api/batches/", "images"), ("/api/analyses/", "image")])
@pytest.mark.parametrize("content_type", ["", "application/json", "multipart/form-data; boundary=B"])
def test_an_upload_with_an_empty_body_is_refused_for_its_missing_file(lab, user, path, field, content_type):
    """An empty body parses to a plain dict, not a form: the empty-file-part check raised a 500 on it."""
    refused = lab.generic("POST", path, b"", content_type=content_type)
    assert refused.status_code == 400, refused.content
    assert field in refused.content.decode()
    assert not Analysis.objects.exists()


def test_a_browsers_session_form_and_drfs_format_override_are_still_taken(user):
    """The browsable API's form sends its CSRF token as a field; ?format=json is DRF's own."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    browser.get("/api/batches/", HTTP_ACCEPT="text/html")
    token = browser.cookies["csrftoken"].value
    sent = browser.post("/api/batches/?format=json", {"images": [upload("a.png")], "csrfmiddlewaretoken": token})
    assert sent.status_code == 202, sent.content


def test_a_filter_given_twice_is_refused_not_read_as_its_last_value(lab, user):
    for path in ("/api/analyses/?status=done&status=failed", "/api/batches/?sample_reference=A&sample_reference=B"):
        refused = lab.get(path)
        assert refused.status_code == 400 and "sent more than once" in refused.json()["detail"], path


def test_an_empty_filter_is_refused_not_read_as_no_filter(lab, user):
    """A lab system's unset variable: ?batch= listed every cell of the account as the batch's, and
    ?sample_reference= the batches that have no reference."""
    services.create_batch(owner=user, uploads=[upload("a.png")])  # a batch without a reference
    services.create_batch(owner=user, uploads=[upload("b.png")], sample_reference="W-1")
    for path in (
        "/api/batches/?sample_reference=",
        "/api/batches/?sample_reference=%20",
        "/api/analyses/?batch=",
        "/api/analyses/?status=",
        "/api/analyses/?label=",
        "/api/analyses/?borderline=",
    ):
        refused = lab.get(path)
        name = path.split("?")[1].split("=")[0]
        assert refused.status_code == 400 and f"{name} is empty" in refused.json()["detail"], path
    found = lab.get("/api/batches/?sample_reference=%20w-1%20").json()["results"]
    assert [batch["sample_reference"] for batch in found] == ["W-1"]


def test_an_idempotency_key_where_none_is_taken_is_refused_not_ignored(lab, user):
    refused = lab.post("/api/analyses/", {"image": upload()}, HTTP_IDEMPOTENCY_KEY="run-1")
    assert refused.status_code == 400 and "POST /api/batches/" in refused.json()["detail"]
    assert not Analysis.objects.exists()


def test_the_token_is_not_cached_and_a_lockout_says_when_to_try_again(db, user, settings):
    from tests.factories import PASSWORD

    settings.LOGIN_MAX_FAILURES = 1
    issued = APIClient().post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert issued.status_code == 200 and issued["Cache-Control"] == "no-store"
    wrong = APIClient().post("/api/auth/token/", {"username": user.username, "password": "wrong"})
    assert wrong.status_code == 400 and wrong.json()["detail"] == "Unable to log in with provided credentials."
    locked = APIClient().post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert locked.status_code == 429 and int(locked["Retry-After"]) == settings.LOGIN_LOCKOUT_SECONDS


@pytest.mark.parametrize(("path", "field"), UPLOADS)
def test_a_multipart_body_without_its_boundary_is_refused_as_such(lab, user, path, field):
    refused = lab.generic("POST", path, _multipart([(field, "a.png", b"x")]), content_type="multipart/form-data")
    assert refused.status_code == 400
    assert refused.json()["detail"].startswith("Multipart form parse error - Invalid boundary")


def test_every_operation_says_it_may_be_rate_limited(lab, user, monkeypatch, client):
    """API_USER_RATE counts every request, downloads included: a client made from the schema must
    expect the 429 (with Retry-After) on each operation, not only on the lists and uploads."""
    import yaml

    from diagnosis.api.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "rate", "1/hour", raising=False)
    analysis = services.create_analysis(owner=user, upload=upload())
    assert lab.get(f"/api/analyses/{analysis.pk}/").status_code == 200
    refused = lab.get(f"/api/analyses/{analysis.pk}/image/")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    paths = yaml.safe_load(client.get("/api/schema/").content)["paths"]
    without = [
        f"{method} {path}"
        for path, ops in paths.items()
        for method, op in ops.items()
        if "Retry-After" not in op["responses"].get("429", {}).get("headers", {})  # how long to wait, too
    ]
    assert without == []


def test_results_as_of_moves_on_when_a_cell_is_deleted_or_sent_for_analysis_again(lab, user):
    """A lab system polling a batch (no callback) keeps the latest results_as_of: a deletion or a
    retry changes the results, and went back to an earlier cell's time."""
    from datetime import timedelta

    from django.utils import timezone

    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png"), upload("c.png")])
    first, second, third = batch.analyses.order_by("pk")
    classified(first, finished_at=timezone.now() - timedelta(hours=2))
    classified(second, finished_at=timezone.now() - timedelta(hours=1))
    Analysis.objects.filter(pk=third.pk).update(
        status="failed", error="Model unavailable", finished_at=second.finished_at
    )
    as_of = lambda: lab.get(f"/api/batches/{batch.pk}/").json()["results_as_of"]  # noqa: E731
    before = as_of()
    assert lab.delete(f"/api/analyses/{second.pk}/").status_code == 204
    after_deletion = as_of()
    assert after_deletion > before
    assert lab.post(f"/api/batches/{batch.pk}/retry-failed/").status_code == 202
    assert as_of() > after_deletion


def test_the_schema_lists_what_uploads_and_records_are_refused_with(lab, user, client, settings):
    """What an integrator's generated client is told to expect: the 415 a JSON upload gets (the
    first thing one tries), the 400 any operation gives a NUL in its query, a batch's bounds."""
    import yaml

    document = yaml.safe_load(client.get("/api/schema/").content)
    for path in ("/api/analyses/", "/api/batches/"):
        refused = lab.post(path, {"images": []}, format="json")
        assert refused.status_code == 415 and refused.json()["detail"]
        assert "415" in document["paths"][path]["post"]["responses"], path
    analysis = services.create_analysis(owner=user, upload=upload())
    assert lab.get(f"/api/analyses/{analysis.pk}/?x=%00").status_code == 400
    without_400 = [
        f"{method} {path}"
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "400" not in operation["responses"]
    ]
    assert without_400 == []
    images = document["components"]["schemas"]["BatchUploadRequest"]["properties"]["images"]
    assert (images["minItems"], images["maxItems"]) == (1, settings.BATCH_MAX_FILES)
    as_of = document["components"]["schemas"]["Batch"]["properties"]["results_as_of"]["description"]
    assert "sent for analysis again" in as_of
    # Most batches have no callback: "", which a client checking the format of a URI would refuse.
    assert "format" not in document["components"]["schemas"]["Batch"]["properties"]["callback_url"]
    assert lab.post("/api/batches/", {"images": [upload("a.png")]}).json()["callback_url"] == ""
    # docs/deploy.md names the fields of the monitoring endpoint to alert on: so does the schema.
    ops = document["paths"]["/api/ops/status/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    fields = document["components"]["schemas"][ops["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert {"oldest_queued_seconds", "oldest_running_seconds", "failed_last_24h", "callbacks_failed"} <= set(fields)
    # An internal class's docstring described every operation of the analyses and batches.
    described = [op.get("description", "") for ops in document["paths"].values() for op in ops.values()]
    assert all(described) and not [text for text in described if "OPTIONS describes" in text]
