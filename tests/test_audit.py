"""The access trail: who opened, downloaded, exported, uploaded, reviewed or deleted which record."""

import csv
import io
import re
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis import audit, services
from diagnosis.models import AccessEvent, Analysis, Batch, private_storage
from tests.factories import UserFactory, make_reviewer, upload

Action = AccessEvent.Action


@pytest.fixture
def batch(user) -> Batch:
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="W-9")
    for analysis in batch.analyses.all():
        name = private_storage.save(f"overlays/{analysis.pk}.png", ContentFile(b"overlay"))
        Analysis.objects.filter(pk=analysis.pk).update(status="done", label="Parasitized", overlay=name)
    return batch


@pytest.fixture
def cell(batch) -> Analysis:
    return batch.analyses.get(original_filename="a.png")


def trail() -> list[tuple]:
    return list(
        AccessEvent.objects.order_by("id").values_list(
            "username", "action", "channel", "analysis_id", "batch_id", "detail"
        )
    )


def test_each_opening_download_and_export_on_the_site_is_recorded_once(client, user, batch, cell):
    client.force_login(user)
    for url in (
        f"/analyses/{cell.pk}/",
        f"/analyses/{cell.pk}/overlay/",
        f"/analyses/{cell.pk}/thumbnail/",  # comes in bulk with lists: not recorded
        f"/batches/{batch.pk}/",
        f"/batches/{batch.pk}/export.csv",
        f"/batches/{batch.pk}/report/",
        "/export.csv",
        "/",  # the owner's own list: not recorded
        f"/batches/{batch.pk}/status.json",  # the live poll: not recorded
    ):
        assert client.get(url).status_code == 200, url
    u = user.username
    assert trail() == [
        (u, Action.VIEWED, "web", cell.pk, batch.pk, ""),
        (u, Action.DOWNLOADED, "web", cell.pk, batch.pk, "overlay"),
        (u, Action.VIEWED, "web", None, batch.pk, ""),
        (u, Action.EXPORTED, "web", None, batch.pk, "CSV"),
        (u, Action.EXPORTED, "web", None, batch.pk, "printable report"),
        (u, Action.EXPORTED, "web", None, None, "dashboard CSV, 2 rows"),
    ]
    first = AccessEvent.objects.order_by("id").first()
    assert first.user == user and first.owner_id == user.pk and first.client_ip == "127.0.0.1"
    assert AccessEvent.objects.get(detail__startswith="dashboard CSV").owner_id == user.pk  # whose rows left


def test_a_file_there_is_not_yet_or_no_longer_is_a_404_that_records_no_download(client, user, batch, cell):
    api = APIClient()
    api.force_authenticate(user)
    client.force_login(user)
    queued = batch.analyses.get(original_filename="b.png")
    Analysis.objects.filter(pk=queued.pk).update(status="queued", label="", overlay="")  # none yet
    assert client.get(f"/analyses/{queued.pk}/overlay/").status_code == 404
    assert api.get(f"/api/analyses/{queued.pk}/overlay/").status_code == 404
    cell.image.storage.delete(cell.image.name)  # lost from storage
    for url in (f"/analyses/{cell.pk}/image/", f"/analyses/{cell.pk}/picture/", f"/api/analyses/{cell.pk}/image/"):
        assert (client if not url.startswith("/api/") else api).get(url).status_code == 404, url
    assert not AccessEvent.objects.filter(action=Action.DOWNLOADED).exists()


def test_another_users_ids_open_nothing_and_record_nothing(client, other_user, batch, cell):
    client.force_login(other_user)
    for url in (f"/analyses/{cell.pk}/", f"/analyses/{cell.pk}/image/", f"/batches/{batch.pk}/export.csv"):
        assert client.get(url).status_code == 404
    assert trail() == []


def test_upload_and_deletion_are_recorded_and_the_trail_outlives_record_and_user(client, user):
    client.force_login(user)
    response = client.post("/upload/", {"images": [upload("x.png"), upload("y.png")]})
    batch_id = int(response["Location"].strip("/").split("/")[-1])
    cell_id = Analysis.objects.get(original_filename="x.png").pk
    client.get(f"/analyses/{cell_id}/delete/")  # the confirmation page deletes nothing, records nothing
    client.post(f"/analyses/{cell_id}/delete/")
    client.post(f"/batches/{batch_id}/delete/")
    u = user.username
    assert trail() == [
        (u, Action.UPLOADED, "web", None, batch_id, "2 images"),
        (u, Action.DELETED, "web", cell_id, batch_id, "1 cell"),
        (u, Action.DELETED, "web", None, batch_id, "1 cell"),
    ]
    user_id = user.pk
    user.delete()
    assert [(e.user_id, e.username) for e in AccessEvent.objects.all()] == [(user_id, u)] * 3  # as written


def test_api_uploads_reads_downloads_and_deletions_are_recorded(user, batch, cell):
    api = APIClient()
    api.force_authenticate(user)
    created = api.post("/api/analyses/", {"image": upload("z.png")}, format="multipart").json()["id"]
    assert api.get(f"/api/analyses/{cell.pk}/").status_code == 200
    assert api.get(f"/api/analyses/{cell.pk}/image/").status_code == 200
    assert api.get(f"/api/batches/{batch.pk}/").status_code == 200
    assert api.delete(f"/api/batches/{batch.pk}/").status_code == 204
    u = user.username
    assert trail() == [
        (u, Action.UPLOADED, "api", created, None, "1 image"),
        (u, Action.VIEWED, "api", cell.pk, batch.pk, ""),
        (u, Action.DOWNLOADED, "api", cell.pk, batch.pk, "image"),
        (u, Action.VIEWED, "api", None, batch.pk, ""),
        (u, Action.DELETED, "api", None, batch.pk, "2 cells"),
    ]


def test_the_api_retries_answer_with_the_whole_record_and_record_the_read(user, batch, cell):
    """A retry answers the batch or cell as a GET does: a key walking every id through them must
    leave the trace a GET leaves (nothing to retry: a 409, which answers nothing)."""
    Analysis.objects.filter(pk=cell.pk).update(status="failed", error="Model unavailable")
    Batch.objects.filter(pk=batch.pk).update(callback_url="https://lis.example/r", callback_state="failed")
    api = APIClient()
    api.force_authenticate(user)
    assert api.post(f"/api/batches/{batch.pk}/callback/retry/").status_code == 202
    assert api.post(f"/api/analyses/{cell.pk}/retry/").status_code == 202
    Analysis.objects.filter(pk=cell.pk).update(status="failed", error="Model unavailable")
    answered = api.post(f"/api/batches/{batch.pk}/retry-failed/")
    assert answered.status_code == 202 and len(answered.json()["analyses"]) == 2
    u = user.username
    assert trail() == [
        (u, Action.VIEWED, "api", None, batch.pk, "retry answer"),
        (u, Action.VIEWED, "api", cell.pk, batch.pk, "retry answer"),
    ]  # the second batch answer is a repeat within the window
    assert api.post(f"/api/analyses/{cell.pk}/retry/").status_code == 409  # queued now: nothing answered
    assert api.post(f"/api/batches/{batch.pk}/retry-failed/").status_code == 409
    assert len(trail()) == 2


def test_each_page_of_an_api_list_is_recorded_with_the_ids_it_held_once_per_window(user, other_user, batch, cell):
    """A key that reads everything, page by page (a leaked one too), leaves a trace; a lab system
    polling the same page does not bury the trail."""
    services.create_analysis(owner=other_user, upload=upload("theirs.png"))
    api = APIClient()
    api.force_authenticate(user)
    mine = sorted(batch.analyses.values_list("pk", flat=True))
    for _ in range(3):
        assert api.get("/api/analyses/", {"status": "done"}).status_code == 200
    assert api.get("/api/batches/", {"sample_reference": "W-9"}).status_code == 200
    assert api.get("/api/analyses/", {"status": "failed"}).status_code == 200
    entries = list(AccessEvent.objects.order_by("id").values_list("action", "channel", "owner_id", "detail"))
    assert entries == [
        (Action.VIEWED, "api", user.pk, f"list of 2 cells, page 1, ids {mine[0]}–{mine[1]}"),
        (Action.VIEWED, "api", user.pk, f"list of 1 batch, page 1, ids {batch.pk}–{batch.pk}"),
        (Action.VIEWED, "api", user.pk, "list of 0 cells, page 1"),
    ]
    assert not any("W-9" in detail for *_, detail in entries)  # a reference may name a patient
    assert api.get("/api/analyses/", {"page": 2}).status_code == 404  # no such page: nothing was read
    assert AccessEvent.objects.count() == 3


def test_repeated_polls_and_downloads_are_recorded_once_per_window_and_per_file(user, batch, cell):
    api = APIClient()
    api.force_authenticate(user)
    for _ in range(3):
        assert api.get(f"/api/batches/{batch.pk}/").status_code == 200
        assert api.get(f"/api/analyses/{cell.pk}/overlay/").status_code == 200
    assert api.get(f"/api/analyses/{cell.pk}/image/").status_code == 200  # another file: recorded
    assert [(action, detail) for _, action, _, _, _, detail in trail()] == [
        (Action.VIEWED, ""),
        (Action.DOWNLOADED, "overlay"),
        (Action.DOWNLOADED, "image"),
    ]
    elsewhere = APIClient(REMOTE_ADDR="203.0.113.9")  # the same key used from another address: recorded
    elsewhere.force_authenticate(user)
    assert elsewhere.get(f"/api/batches/{batch.pk}/").status_code == 200
    assert AccessEvent.objects.filter(action=Action.VIEWED, client_ip="203.0.113.9").count() == 1
    AccessEvent.objects.filter(client_ip="203.0.113.9").delete()
    AccessEvent.objects.update(at=timezone.now() - audit.REPEAT_WINDOW)
    api.get(f"/api/batches/{batch.pk}/")
    api.get(f"/api/analyses/{cell.pk}/overlay/")
    assert AccessEvent.objects.filter(action=Action.VIEWED).count() == 2
    assert AccessEvent.objects.filter(action=Action.DOWNLOADED).count() == 3


def test_a_reviewer_opening_and_judging_someone_elses_cell_is_recorded_against_the_owner(client, user, cell):
    reviewer = make_reviewer()
    client.force_login(reviewer)
    assert client.get(f"/review/{cell.pk}/").status_code == 200
    assert client.get(f"/analyses/{cell.pk}/thumbnail/").status_code == 200  # as the queue shows it
    assert client.post(f"/review/{cell.pk}/", {"verdict": "agree"}).status_code == 302
    assert trail() == [
        (reviewer.username, Action.VIEWED, "web", cell.pk, cell.batch_id, "review"),
        (reviewer.username, Action.DOWNLOADED, "web", cell.pk, cell.batch_id, "thumbnail"),
        (reviewer.username, Action.REVIEWED, "web", cell.pk, cell.batch_id, "agree"),
    ]
    assert set(AccessEvent.objects.values_list("owner_id", flat=True)) == {user.pk}
    # The queue lists other users' file names, samples and verdicts, some with no thumbnail to record.
    colleague = make_reviewer()
    other = cell.batch.analyses.exclude(pk=cell.pk).get()
    services.review_analysis(
        analysis=other, reviewer=colleague, verdict="disagree", corrected_label="Uninfected", replacing=None
    )
    page = client.get("/review/").content.decode()
    assert "b.png" in page and "W-9" in page  # among the recent disagreements
    ids = sorted([cell.pk, other.pk])
    assert trail()[-1] == (
        reviewer.username,
        Action.VIEWED,
        "web",
        None,
        None,
        f"list of 2 cells, page 1, ids {ids[0]}–{ids[1]}",
    )


def test_the_client_address_comes_from_the_configured_proxy_header(client, settings, user, cell):
    settings.CLIENT_IP_HEADER = "HTTP_X_REAL_IP"
    client.force_login(user)
    client.get(f"/analyses/{cell.pk}/", HTTP_X_REAL_IP="203.0.113.7")
    client.get(f"/analyses/{cell.pk}/image/", HTTP_X_REAL_IP="not an address")
    assert list(AccessEvent.objects.order_by("id").values_list("client_ip", flat=True)) == ["203.0.113.7", None]


def test_admin_views_and_deletions_are_recorded_and_the_trail_is_read_only(admin_client, batch, cell):
    admin_client.get(f"/admin/diagnosis/analysis/{cell.pk}/change/")
    admin_client.post(f"/admin/diagnosis/batch/{batch.pk}/delete/", {"post": "yes"})
    assert [(action, channel, detail) for _, action, channel, _, _, detail in trail()] == [
        (Action.VIEWED, "admin", ""),
        (Action.DELETED, "admin", "2 cells"),
    ]
    assert not Batch.objects.filter(pk=batch.pk).exists()

    listing = admin_client.get("/admin/diagnosis/accessevent/")
    assert listing.status_code == 200 and b"2 cells" in listing.content
    event = AccessEvent.objects.first()
    assert admin_client.get("/admin/diagnosis/accessevent/add/").status_code == 403
    assert admin_client.get(f"/admin/diagnosis/accessevent/{event.pk}/delete/").status_code == 403
    edit = admin_client.post(f"/admin/diagnosis/accessevent/{event.pk}/change/", {"detail": "edited"})
    assert edit.status_code == 403
    event.refresh_from_db()
    assert event.detail != "edited"


def test_admins_export_the_trail_as_csv_safe_for_spreadsheets(admin_client, cell):
    outsider = UserFactory(username="=cmd|calc")
    AccessEvent.objects.create(user=outsider, username=outsider.username, action=Action.VIEWED, channel="web")
    admin_client.get(f"/admin/diagnosis/analysis/{cell.pk}/change/")
    ids = list(AccessEvent.objects.values_list("pk", flat=True))
    response = admin_client.post(
        "/admin/diagnosis/accessevent/", {"action": "export_csv", "_selected_action": [str(pk) for pk in ids]}
    )
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response.streaming  # a year of the trail is never held in memory at once
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode("utf-8-sig"))))
    assert rows[0][:3] == ["at", "username", "action"] and len(rows) == 3
    assert rows[1][1:4] == ["'=cmd|calc", "viewed", "web"]  # oldest first; a formula is defused
    assert rows[2][1:5] == ["admin", "viewed", "admin", str(cell.pk)]


def history_rows(page: str) -> list[str]:
    """The access-history table's body rows as text, newest first (cells joined by |)."""
    body = page.split('id="access-history"')[1].split("<tbody>")[1].split("</tbody>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)
    return ["|".join(re.sub(r"<[^>]+>", "", td) for td in re.findall(r"<td>(.*?)</td>", row)) for row in rows]


def test_the_owner_sees_who_opened_a_cell_and_its_batch(client, user, batch, cell):
    reviewer = make_reviewer()
    client.force_login(reviewer)
    client.post(f"/review/{cell.pk}/", {"verdict": "agree"})
    client.force_login(user)
    client.get(f"/batches/{batch.pk}/export.csv")
    client.get(f"/analyses/{batch.analyses.get(original_filename='b.png').pk}/")  # another cell: not in a's history

    page = client.get(f"/analyses/{cell.pk}/").content.decode()
    assert "Who has opened this cell (3 records)" in page
    rows = history_rows(page)
    assert [row.split("|")[1:] for row in rows] == [
        [user.username, "viewed", "web"],
        [user.username, "exported the batch (CSV)", "web"],
        [reviewer.username, "reviewed (agree)", "web"],
    ]
    assert "127.0.0.1" not in page.split('id="access-history"')[1]  # addresses stay with the administrators

    rows = history_rows(client.get(f"/batches/{batch.pk}/").content.decode())
    assert [row.split("|")[2] for row in rows] == ["viewed", "exported (CSV)"]


def test_a_long_history_shows_the_latest_entries_and_says_how_many_there_are(client, user, cell):
    AccessEvent.objects.bulk_create(
        AccessEvent(username=f"clinician-{k}", action=Action.DOWNLOADED, channel="api", analysis_id=cell.pk)
        for k in range(30)
    )
    client.force_login(user)
    page = client.get(f"/analyses/{cell.pk}/").content.decode()
    assert "Who has opened this cell (31 records)" in page and "the latest 20 are shown here" in page
    rows = history_rows(page)
    assert len(rows) == 20 and rows[0].split("|")[1] == user.username


def test_the_trail_is_searched_exactly_by_id_address_or_user_name(admin_client, db, django_assert_max_num_queries):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def entry(**fields):
        return AccessEvent.objects.create(action=Action.VIEWED, channel="web", **fields).pk

    by_cell = entry(username="ana", analysis_id=41, client_ip="203.0.113.9")
    by_batch = entry(username="bo", batch_id=41)
    by_owner = entry(username="ana-maria", owner_id=41)
    elsewhere = entry(username="carl", analysis_id=410, client_ip="203.0.113.90")

    def found(term: str) -> set[int]:
        page = admin_client.get("/admin/diagnosis/accessevent/", {"q": term})
        assert page.status_code == 200, term
        return {
            pk
            for pk in (by_cell, by_batch, by_owner, elsewhere)
            if f"/accessevent/{pk}/change/" in page.content.decode()
        }

    assert found("41") == {by_cell, by_batch, by_owner}
    assert found("203.0.113.9") == {by_cell}
    assert found("ana") == {by_cell}  # the whole name, not a part of another
    assert found("99999999999") == found("²") == set()
    with CaptureQueriesContext(connection) as queries:
        found("41")
    trail_queries = [q["sql"] for q in queries.captured_queries if "diagnosis_accessevent" in q["sql"]]
    assert not any("LIKE" in sql or "UPPER" in sql for sql in trail_queries), trail_queries


def test_removing_a_user_leaves_their_trail_entries_as_written(admin_client, db):
    clinician = UserFactory()
    AccessEvent.objects.create(user=clinician, username=clinician.username, action=Action.VIEWED, channel="web")
    user_id = clinician.pk
    assert admin_client.post(f"/admin/auth/user/{user_id}/delete/", {"post": "yes"}).status_code == 302
    kept = AccessEvent.objects.get(username=clinician.username)
    assert kept.user_id == user_id  # not rewritten to NULL
    assert admin_client.get(f"/admin/diagnosis/accessevent/{kept.pk}/change/").status_code == 200


@pytest.mark.parametrize("channel", ["api-batch", "api-single", "web"])
def test_an_upload_the_trail_could_not_record_is_not_stored(transactional_db, user, monkeypatch, channel):
    """The trail's entry and the upload commit together: the connection dropping as the entry is
    written used to leave the batch stored, analysed and sent to its lab system, unrecorded, while
    the client was answered 500 (and, retrying, made a second one)."""
    from django.db import OperationalError
    from django.test import Client

    from tests.conftest import stored_files

    monkeypatch.setattr("diagnosis.services.enqueue_analyses", lambda **kwargs: None)
    save = AccessEvent.save

    def connection_dropped(self, *args, **kwargs):
        if self.action == AccessEvent.Action.UPLOADED:
            raise OperationalError("server closed the connection unexpectedly")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(AccessEvent, "save", connection_dropped)
    media_root = Path(django_settings.MEDIA_ROOT)
    before = set(stored_files(media_root))
    if channel == "web":
        client = Client(raise_request_exception=False)
        client.force_login(user)
        response = client.post("/upload/", {"images": [upload("a.png")], "sample_reference": "WARD-3"})
    else:
        client = APIClient(raise_request_exception=False)
        client.force_authenticate(user)
        path, field = ("/api/batches/", "images") if channel == "api-batch" else ("/api/analyses/", "image")
        response = client.post(path, {field: [upload("a.png")] if field == "images" else upload("a.png")})
    assert response.status_code == 500
    assert (Batch.objects.count(), Analysis.objects.count(), AccessEvent.objects.count()) == (0, 0, 0)
    assert set(stored_files(media_root)) == before, "the upload's files stayed"
