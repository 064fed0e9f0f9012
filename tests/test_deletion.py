"""Owners delete analyses and batches for good, files included; nobody else can, by any route.
The retention period deletes old ones the same way."""

import io
import os
import re
import time
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis import services, tasks
from diagnosis.audit import record_retention_deletion
from diagnosis.models import AccessEvent, Analysis, Batch, private_storage
from tests.factories import upload


def stored_files(analysis: Analysis) -> list[str]:
    return [field.name for field in (analysis.image, analysis.thumbnail, analysis.overlay) if field]


def with_overlay(analysis: Analysis) -> Analysis:
    name = private_storage.save(f"overlays/{analysis.pk}.png", ContentFile(b"overlay"))
    Analysis.objects.filter(pk=analysis.pk).update(status="done", label="Uninfected", overlay=name)
    return Analysis.objects.get(pk=analysis.pk)


@pytest.fixture
def batch(user) -> Batch:
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="W-3")
    for analysis in batch.analyses.all():
        with_overlay(analysis)
    return batch


@pytest.fixture
def boss(db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser("boss", password="pw-for-tests-123")


def all_files(batch: Batch) -> list[str]:
    names = [name for analysis in batch.analyses.all() for name in stored_files(analysis)]
    assert len(names) == 6 and all(private_storage.exists(name) for name in names)
    return names


def test_owner_deletes_one_cell_from_the_page_and_its_files_go(client, user, batch, django_capture_on_commit_callbacks):
    analysis = batch.analyses.get(original_filename="a.png")
    files = stored_files(analysis)
    client.force_login(user)
    confirm = client.get(f"/analyses/{analysis.pk}/delete/").content.decode()
    assert "Delete a.png?" in confirm and "1 cell image for good" in confirm
    assert f"/analyses/{analysis.pk}/thumbnail/" in confirm and f"batch #{batch.pk}" in confirm
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/analyses/{analysis.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == f"/batches/{batch.pk}/"
    batch_page = client.get(response["Location"]).content.decode()
    assert "Deleted a.png" in batch_page and "1 cell of this batch was deleted" in batch_page
    assert not Analysis.objects.filter(pk=analysis.pk).exists()
    assert not any(private_storage.exists(name) for name in files)
    assert [a.original_filename for a in batch.analyses.all()] == ["b.png"]


DELETING = {
    ("page", "cell"): ("POST", "/analyses/{pk}/delete/"),
    ("page", "batch"): ("POST", "/batches/{pk}/delete/"),
    ("api", "cell"): ("DELETE", "/api/analyses/{pk}/"),
    ("api", "batch"): ("DELETE", "/api/batches/{pk}/"),
    ("admin", "cell"): ("POST", "/admin/diagnosis/analysis/"),
    ("admin", "batch"): ("POST", "/admin/diagnosis/batch/"),
}


@pytest.mark.parametrize(("channel", "record"), list(DELETING), ids=["-".join(key) for key in DELETING])
def test_a_deletion_that_fails_is_not_recorded_as_done(client, user, batch, boss, monkeypatch, channel, record):
    """The trail's entry was written before the deletion ran: one that failed still said "deleted",
    and the batch page counted the cell as gone while it was still listed. It fails here after its
    row is deleted, which the transaction takes back too."""
    from diagnosis import selectors
    from diagnosis.models import AccessEvent

    model = Analysis if record == "cell" else Batch
    target = batch.analyses.get(original_filename="a.png") if record == "cell" else batch
    deletes = model.delete

    def fails_once_deleted(self, *args, **kwargs):
        deletes(self, *args, **kwargs)
        raise RuntimeError("database went away")

    monkeypatch.setattr(model, "delete", fails_once_deleted)
    method, path = DELETING[channel, record]
    if channel == "admin":
        client.force_login(boss)
        body = {"action": "delete_selected", "_selected_action": [target.pk], "post": "yes"}
    else:
        client.force_login(user)
        body = None
    client.raise_request_exception = False
    response = client.generic(
        method,
        path.format(pk=target.pk),
        urlencode(body or {}, doseq=True),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 500
    assert not AccessEvent.objects.filter(action=AccessEvent.Action.DELETED).exists()
    assert model.objects.filter(pk=target.pk).exists() and selectors.cells_deleted_from(batch=batch) == 0


@pytest.mark.parametrize("record", ["cell", "batch"])
def test_a_deletion_whose_trail_entry_fails_deletes_nothing(user, batch, record):
    """The caller's ``record`` runs in the deletion's own transaction, given the batch's cell count."""
    recorded = []

    def fails(*args) -> None:
        recorded.append(args)
        raise RuntimeError("the trail could not be written")

    with pytest.raises(RuntimeError):
        if record == "cell":
            services.delete_analysis(analysis=batch.analyses.get(original_filename="a.png"), record=fails)
        else:
            services.delete_batch(batch=batch, record=fails)
    assert batch.analyses.count() == 2 and Batch.objects.filter(pk=batch.pk).exists()
    given = [args[1:] for args in recorded]  # what came beside the record: the batch's cell count
    assert given == ([()] if record == "cell" else [(2,)])


def test_a_batch_deleted_meanwhile_is_a_404_not_an_error(user, batch):
    """A second click, or a DELETE retried after a timeout, that reaches the lock after the first one
    deleted the batch."""
    from django.http import Http404

    seen_earlier = Batch.objects.get(pk=batch.pk)
    services.delete_batch(batch=batch)
    with pytest.raises(Http404):
        services.delete_batch(batch=seen_earlier)


def test_the_admins_delete_selected_skips_a_batch_deleted_meanwhile(user, batch, boss, rf):
    """Another admin, or the owner, deleted one of the chosen batches while the action ran: the
    others are still deleted, and only they are recorded."""
    from django.contrib import admin

    from diagnosis.admin import BatchAdmin
    from diagnosis.models import AccessEvent

    other = services.create_batch(owner=user, uploads=[upload("c.png")])
    seen_earlier = Batch.objects.get(pk=batch.pk)
    services.delete_batch(batch=batch)
    request = rf.post("/admin/diagnosis/batch/")
    request.user = boss
    BatchAdmin(Batch, admin.site).delete_queryset(request, [seen_earlier, other])
    assert not Batch.objects.exists()
    deleted = AccessEvent.objects.filter(action=AccessEvent.Action.DELETED)
    assert list(deleted.values_list("batch_id", flat=True)) == [other.pk]


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_back_to_a_deleted_cell_says_it_may_have_been_deleted(client, user, batch, settings, debug):
    """scripts/start runs with DEBUG on, where Django answers a missing record with its debug page."""
    settings.DEBUG = debug
    analysis = batch.analyses.get(original_filename="a.png")
    client.force_login(user)
    client.post(f"/analyses/{analysis.pk}/delete/")
    back = client.get(f"/analyses/{analysis.pk}/")
    assert back.status_code == 404 and "the record may have been deleted" in back.content.decode()
    assert "URLconf" not in back.content.decode()


def test_owner_deletes_a_whole_batch_from_the_page(client, user, batch, django_capture_on_commit_callbacks):
    files = all_files(batch)
    client.force_login(user)
    confirm = client.get(f"/batches/{batch.pk}/delete/").content.decode()
    assert f"Delete batch #{batch.pk} (W-3)?" in confirm and "2 cell images for good" in confirm
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/batches/{batch.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == "/batches/"
    assert not Batch.objects.exists() and not Analysis.objects.exists()
    assert not any(private_storage.exists(name) for name in files)


def test_the_batch_delete_page_names_the_lab_system_its_results_may_have_reached(client, user, batch):
    """An attempt the receiver answered with a 500 may have stored the results, and the deletion
    withdraws them there: the page said so only once delivery was confirmed."""
    client.force_login(user)

    def told() -> str:
        page = client.get(f"/batches/{batch.pk}/delete/").content.decode()
        return re.search(r"Its results (.*?) sent to the lab system at ([^:]+)", page)

    assert told() is None  # no callback
    Batch.objects.filter(pk=batch.pk).update(callback_url="https://lis.example/results")
    assert told() is None  # never sent: deleted outright, nothing to tell
    Batch.objects.filter(pk=batch.pk).update(callback_first_sent_at=timezone.now(), callback_attempts=6)
    assert told().groups() == ("may have been", "lis.example")
    Batch.objects.filter(pk=batch.pk).update(callback_delivered_at=timezone.now())
    assert told().groups() == ("were", "lis.example")


def test_api_deletes_analyses_and_batches_with_204(user, batch, django_capture_on_commit_callbacks):
    files = all_files(batch)
    api = APIClient()
    api.force_authenticate(user)
    single = services.create_analysis(owner=user, upload=upload("single.png"))
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/analyses/{single.pk}/").status_code == 204
        assert api.delete(f"/api/batches/{batch.pk}/").status_code == 204
    assert not Analysis.objects.exists()
    assert not any(private_storage.exists(name) for name in files + stored_files(single))
    assert api.get(f"/api/batches/{batch.pk}/").status_code == 404


def test_an_outsider_deletes_nothing(client, other_user, batch, django_capture_on_commit_callbacks):
    files = all_files(batch)
    analysis = batch.analyses.first()
    client.force_login(other_user)
    api = APIClient()
    api.force_authenticate(other_user)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/analyses/{analysis.pk}/delete/").status_code == 404
        assert client.post(f"/batches/{batch.pk}/delete/").status_code == 404
        assert api.delete(f"/api/analyses/{analysis.pk}/").status_code == 404
        assert api.delete(f"/api/batches/{batch.pk}/").status_code == 404
    assert batch.analyses.count() == 2 and all(private_storage.exists(name) for name in files)


def test_deleting_needs_a_post_with_the_csrf_token(user, batch):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    analysis = batch.analyses.first()
    assert browser.post(f"/analyses/{analysis.pk}/delete/").status_code == 403
    assert Analysis.objects.filter(pk=analysis.pk).exists()


def test_removing_a_user_removes_their_patients_images(user, batch, django_capture_on_commit_callbacks):
    files = all_files(batch)
    with django_capture_on_commit_callbacks(execute=True):
        user.delete()
    assert not Analysis.objects.exists()
    assert not any(private_storage.exists(name) for name in files)


def test_a_rolled_back_deletion_keeps_the_files(user, batch, django_capture_on_commit_callbacks):
    files = all_files(batch)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            services.delete_batch(batch=batch)
            raise RuntimeError("the request failed after the delete")
    assert Analysis.objects.count() == 2 and all(private_storage.exists(name) for name in files)


def record_uninfected(analysis: Analysis, *, task_id: str) -> bool:
    return services.record_result(
        analysis=analysis,
        task_id=task_id,
        label="Uninfected",
        probability_parasitized=0.1,
        decision_threshold=0.5,
        model_version="m",
        overlay_png=b"png",
        inference_ms=1.0,
    )


def no_worker(**kwargs) -> None:
    """Committed cells are not sent to the broker: a session worker still running from an earlier
    test would take them, and claim them before the test does."""


def test_a_file_that_cannot_be_removed_leaves_the_other_files_to_go(transactional_db, user, monkeypatch, caplog):
    """Once the rows are gone nothing else would remove the files: one refusal (a read-only or
    failing volume) must not keep the rest of a batch's images on disk."""
    monkeypatch.setattr("diagnosis.services.enqueue_analyses", no_worker)
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="W-4")
    for analysis in batch.analyses.all():
        with_overlay(analysis)
    names = all_files(batch)
    stuck = names[0]
    delete = private_storage.delete

    def refuse_one(name):
        if name == stuck:
            raise PermissionError(13, "Permission denied", name)
        delete(name)

    monkeypatch.setattr(private_storage, "delete", refuse_one)
    services.delete_batch(batch=batch)  # commits at once: no test transaction around it
    assert [name for name in names if private_storage.exists(name)] == [stuck]
    assert f"event=file_not_deleted name={stuck}" in caplog.text
    delete(stuck)


def test_a_result_for_a_cell_deleted_while_the_worker_ran_leaves_no_heatmap(user):
    analysis = services.create_analysis(owner=user, upload=upload())
    assert services.claim_analysis(analysis_id=analysis.pk, task_id="t")
    Analysis.objects.filter(pk=analysis.pk).delete()
    private_storage.delete(f"overlays/{analysis.pk}.png")  # an earlier test's cell may have had this id (SQLite)
    recorded = record_uninfected(analysis, task_id="t")
    assert not recorded and not private_storage.exists(f"overlays/{analysis.pk}.png")


def test_a_cell_deleted_as_soon_as_its_result_is_committed_does_not_fail_the_task(transactional_db, user, monkeypatch):
    monkeypatch.setattr("diagnosis.services.enqueue_analyses", no_worker)
    analysis = services.create_analysis(owner=user, upload=upload())
    assert services.claim_analysis(analysis_id=analysis.pk, task_id="t")
    save_overlay = private_storage.save

    def save_then_delete_on_commit(name, content, **kwargs):
        # The owner's delete was waiting on the row lock: it lands the moment the result commits.
        transaction.on_commit(lambda: services.delete_analysis(analysis=Analysis.objects.get(pk=analysis.pk)))
        return save_overlay(name, content, **kwargs)

    monkeypatch.setattr(private_storage, "save", save_then_delete_on_commit)
    recorded = record_uninfected(analysis, task_id="t")
    assert recorded and analysis.status == Analysis.Status.DONE and analysis.model_version == "m"
    assert not Analysis.objects.filter(pk=analysis.pk).exists()


def test_retention_deletes_old_analyses_their_files_and_emptied_batches(
    user, batch, settings, django_capture_on_commit_callbacks
):
    old_files = all_files(batch)
    mixed = services.create_batch(owner=user, uploads=[upload("old.png"), upload("new.png")])
    fresh = services.create_analysis(owner=user, upload=upload("fresh.png"))
    long_ago = timezone.now() - timedelta(days=40)
    batch.analyses.update(created_at=long_ago)
    Batch.objects.filter(pk__in=[batch.pk, mixed.pk]).update(created_at=long_ago)
    mixed.analyses.filter(original_filename="old.png").update(created_at=long_ago)
    old_cells = set(Analysis.objects.filter(created_at=long_ago).values_list("pk", "batch_id", "owner_id"))

    with django_capture_on_commit_callbacks(execute=True):
        call_command("delete_expired_analyses", days=30, stdout=io.StringIO())
    assert sorted(Analysis.objects.values_list("original_filename", flat=True)) == ["fresh.png", "new.png"]
    assert list(Batch.objects.all()) == [mixed]
    assert not any(private_storage.exists(name) for name in old_files)
    assert all(private_storage.exists(name) for name in stored_files(fresh))
    # Each cell's trail ends saying why it went.
    from diagnosis.models import AccessEvent

    ended = AccessEvent.objects.filter(username="(retention)", action="deleted", channel="cli")
    assert {(e.analysis_id, e.batch_id, e.owner_id) for e in ended} == old_cells
    assert all("over 30 days ago" in e.detail for e in ended)

    Analysis.objects.update(created_at=long_ago)
    for no_period in (0, -5):  # the daily task keeps everything then, even if run by hand
        settings.ANALYSIS_RETENTION_DAYS = no_period
        assert tasks.delete_expired_analyses() == 0 and Analysis.objects.count() == 2
    with pytest.raises(ValueError, match="must be positive"):
        services.delete_expired_analyses(older_than=timedelta(days=-1))
    settings.ANALYSIS_RETENTION_DAYS = 30
    assert tasks.delete_expired_analyses() == 2 and not Analysis.objects.exists()


def test_retention_command_refuses_to_run_without_a_period(settings):
    settings.ANALYSIS_RETENTION_DAYS = 0
    with pytest.raises(CommandError, match="No retention period"):
        call_command("delete_expired_analyses")


@pytest.mark.parametrize("days", [0, -5, 10**9])
def test_retention_command_names_a_days_option_out_of_range(settings, user, days):
    """--days -5 was told "No retention period" (set with --days), and 10**9 was an OverflowError."""
    settings.ANALYSIS_RETENTION_DAYS = 30
    analysis = services.create_analysis(owner=user, upload=upload("kept.png"))
    with pytest.raises(CommandError, match=f"--days {days}: give a retention period from 1 to 36500 days"):
        call_command("delete_expired_analyses", days=days)
    assert Analysis.objects.filter(pk=analysis.pk).exists()


def test_files_a_killed_upload_left_are_deleted_once_they_are_old_and_no_others(
    user, media_root, monkeypatch, settings
):
    """The rows of an upload process killed mid-batch are rolled back; the files it wrote are not."""
    kept = with_overlay(services.create_analysis(owner=user, upload=upload("kept.png")))
    before = set(media_root.rglob("*"))
    with pytest.raises(RuntimeError), transaction.atomic():  # the process dies before its commit
        services.create_analysis(owner=user, upload=upload("killed.png"))
        raise RuntimeError("SIGKILL")
    orphaned = [path for path in set(media_root.rglob("*")) - before if path.is_file()]
    assert len(orphaned) == 2  # its image and thumbnail
    orphaned.append(media_root / "overlays" / "999999.png")  # an overlay of a cell deleted mid-task
    orphaned[-1].write_bytes(b"overlay")
    being_stored = media_root / "uploads" / "f00d.png"  # an upload still being stored: no row yet
    being_stored.write_bytes(b"png")
    # Large uploads spool beside the others; a request killed while reading one leaves its copy.
    spools = media_root / "incoming"  # FILE_UPLOAD_TEMP_DIR in the tests, as beside the uploads in production
    orphaned.append(spools / "tmpl4h7yhn7.upload.png")
    orphaned[-1].write_bytes(b"the first megabytes of a patient's image")
    being_read = spools / "tmpq0x1.upload.png"  # a request still reading its upload
    being_read.write_bytes(b"png")
    hours_ago = time.time() - 7 * 3600
    for path in orphaned:
        os.utime(path, (hours_ago, hours_ago))
    for name in stored_files(kept):
        os.utime(media_root / name, (hours_ago, hours_ago))

    vanishing = media_root / "thumbnails" / "deleted-meanwhile.png"  # gone between the listing and its look
    vanishing.write_bytes(b"png")
    modified = private_storage.get_modified_time

    def deleted_meanwhile(name):
        if name.endswith(vanishing.name):
            vanishing.unlink()
        return modified(name)

    monkeypatch.setattr(private_storage, "get_modified_time", deleted_meanwhile)
    assert tasks.delete_orphaned_files() == len(orphaned) >= 3
    assert not any(path.exists() for path in orphaned)
    assert being_stored.exists() and being_read.exists()
    assert all(private_storage.exists(name) for name in stored_files(kept))
    assert "diagnosis.tasks.delete_orphaned_files" in {e["task"] for e in settings.CELERY_BEAT_SCHEDULE.values()}
    settings.FILE_UPLOAD_TEMP_DIR = str(media_root / "removed-with-a-restore")
    assert tasks.delete_orphaned_files() == 0  # no spool folder: nothing to sweep there, and no failure


def test_a_retention_run_by_hand_is_recorded_as_run_by_hand(user, settings):
    """`delete_expired_analyses --days 30` where ANALYSIS_RETENTION_DAYS is not set recorded each
    deletion as "(ANALYSIS_RETENTION_DAYS)": the trail named a setting nobody set as the reason."""
    settings.ANALYSIS_RETENTION_DAYS = 0
    cell = services.create_analysis(owner=user, upload=upload("a.png"))
    Analysis.objects.filter(pk=cell.pk).update(created_at=timezone.now() - timedelta(days=40))
    call_command("delete_expired_analyses", days=30, stdout=io.StringIO())
    (entry,) = AccessEvent.objects.filter(action=AccessEvent.Action.DELETED)
    assert entry.detail == "uploaded over 30 days ago (delete_expired_analyses --days 30)"


def test_overlapping_retention_runs_record_each_deletion_once(user, monkeypatch):
    """Two runs at once (beat's at 03:00 and one by hand) list the same cells; the one whose delete
    found some already gone still recorded a deletion for every cell it had listed: twice in the trail."""
    ids = []
    for n in range(3):
        ids.append(services.create_analysis(owner=user, upload=upload(f"{n}.png")).pk)
    Analysis.objects.filter(pk__in=ids).update(created_at=timezone.now() - timedelta(days=40))
    atomic, other_run = transaction.atomic, []

    def the_other_run_first(*args, **kwargs):
        if not other_run:  # between this run's listing and its chunk, the other takes one cell
            other_run.append(ids[0])
            Analysis.objects.filter(pk=ids[0]).delete()
            record_retention_deletion(cells=[(ids[0], None, user.pk)], older_than_days=30)
        return atomic(*args, **kwargs)

    monkeypatch.setattr(services.transaction, "atomic", the_other_run_first)
    assert services.delete_expired_analyses(older_than=timedelta(days=30)) == 2
    monkeypatch.undo()
    deleted = AccessEvent.objects.filter(action=AccessEvent.Action.DELETED)
    assert sorted(deleted.values_list("analysis_id", flat=True)) == sorted(ids)


def test_a_batch_deletion_counts_its_cells_under_the_lock_not_those_listed_before(user, monkeypatch):
    """The owner's deletion of one cell, committed while the batch's deletion waited for the lock,
    was counted again in the batch's entry: the trail said 3 cells went where the batch held 2."""
    from django.shortcuts import get_object_or_404
    from django.test import RequestFactory

    from diagnosis.audit import deletion_recorder

    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")], sample_reference="W-1")
    request = RequestFactory().post(f"/batches/{batch.pk}/delete/")
    request.user = user
    record = deletion_recorder(request=request)

    def lock_after_a_cell_is_deleted_meanwhile(queryset, **lookup):  # what the lock waits for
        if batch.analyses.count() == 2:
            services.delete_analysis(analysis=batch.analyses.order_by("pk").first(), record=record)
        return get_object_or_404(queryset, **lookup)

    monkeypatch.setattr(services, "get_object_or_404", lock_after_a_cell_is_deleted_meanwhile)
    services.delete_batch(batch=batch, record=record)

    entries = AccessEvent.objects.filter(action=AccessEvent.Action.DELETED).order_by("pk")
    assert [entry.detail for entry in entries] == ["1 cell", "1 cell"]
