"""Two writers at once on PostgreSQL: a batch deleted while one of its cells is reviewed, deleted or
analysed again, and a review saved as its cell is deleted. Each side runs over a connection of its
own; PostgreSQL only, as row locks and deadlocks are (SQLite serialises whole transactions)."""

import os
import threading

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models.signals import post_delete
from django.test import RequestFactory

from diagnosis import services
from diagnosis.models import Analysis, Batch
from tests.conftest import someone_waits_on_a_lock, wait_for
from tests.factories import UserFactory, classified, upload

PG_ONLY = pytest.mark.skipif(
    "sqlite" in os.environ.get("DATABASE_URL", "sqlite"), reason="PostgreSQL only (CI): row locks"
)
pytestmark = pytest.mark.django_db(transaction=True)  # each side commits over a connection of its own


def _in_thread(target, outcome: list, name: str) -> threading.Thread:
    def run():
        try:
            target()
            outcome.append((name, "ok"))
        except Exception as error:  # noqa: BLE001 - what the request would have answered with a 500
            outcome.append((name, f"{error.__class__.__name__}: {error}".splitlines()[0]))
        finally:
            connection.close()

    return threading.Thread(target=run, name=name)


def _race(first: threading.Thread, second: threading.Thread, *, paused: threading.Event, go_on: threading.Event):
    """Start ``first``; once it has paused holding its locks, start ``second`` and let it reach its
    wait on them (or, fixed, on what ``first`` took before them); then let both finish."""
    first.start()
    assert paused.wait(10)
    second.start()
    try:  # else the second could start after the first had finished, and no race was run
        wait_for(someone_waits_on_a_lock, timeout=20, interval=0.05)
    except AssertionError:
        raise AssertionError(f"{second.name} never waited on {first.name}'s locks") from None
    finally:
        go_on.set()
    first.join(30)
    second.join(30)


def _lab_batch(owner) -> Batch:
    """A lab system's batch, finished, whose results went out to its callback."""
    batch = services.create_batch(
        owner=owner, uploads=[upload("a.png"), upload("b.png")], callback_url="http://127.0.0.1:9/results"
    )
    for cell in batch.analyses.all():
        classified(cell)
    Batch.objects.filter(pk=batch.pk).update(callback_state=Batch.CallbackState.DELIVERED)
    return Batch.objects.get(pk=batch.pk)


@PG_ONLY
def test_a_review_saved_while_the_lab_system_deletes_the_batch_is_no_deadlock(monkeypatch):
    """review_analysis locked the cell, then its batch (send_again); delete_batch locks the batch,
    then its cells: run at once they deadlocked, and PostgreSQL killed one of them (a 500)."""
    owner, reviewer = UserFactory(), UserFactory()
    batch = _lab_batch(owner)
    cell = batch.analyses.order_by("pk").first()
    cell_locked, go_on, outcome = threading.Event(), threading.Event(), []
    real_send_again = services.send_again

    def send_again_after_the_deletion_started(**kwargs):
        cell_locked.set()  # the review's UPDATE of the cell is done, uncommitted
        go_on.wait(10)
        return real_send_again(**kwargs)

    monkeypatch.setattr(services, "send_again", send_again_after_the_deletion_started)
    review = _in_thread(
        lambda: services.review_analysis(
            analysis=Analysis.objects.get(pk=cell.pk), reviewer=reviewer, verdict="agree", replacing=None
        ),
        outcome,
        "review",
    )
    delete = _in_thread(lambda: services.delete_batch(batch=Batch.objects.get(pk=batch.pk)), outcome, "delete")
    # The deletion waits on the cell the review holds (or, fixed, on the batch).
    _race(review, delete, paused=cell_locked, go_on=go_on)
    assert sorted(outcome) == [("delete", "ok"), ("review", "ok")], outcome


@PG_ONLY
def test_a_cell_deleted_while_its_batch_is_deleted_is_no_deadlock():
    """delete_analysis deleted the cell, then updated its batch; delete_batch locks the batch, then
    deletes its cells: an admin removing a cell as its owner removed the batch got a 500 (or the owner did)."""
    owner = UserFactory()
    batch = services.create_batch(owner=owner, uploads=[upload("a.png"), upload("b.png")])
    cell = batch.analyses.order_by("pk").first()
    cell_deleted, go_on, outcome = threading.Event(), threading.Event(), []

    def pause_the_cells_deletion(sender, instance, **kwargs):
        if threading.current_thread().name == "cell" and instance.pk == cell.pk:
            cell_deleted.set()  # the cell's row is deleted, uncommitted; its batch not yet updated
            go_on.wait(10)

    post_delete.connect(pause_the_cells_deletion, sender=Analysis, dispatch_uid="concurrency-pause")
    try:
        one = _in_thread(lambda: services.delete_analysis(analysis=Analysis.objects.get(pk=cell.pk)), outcome, "cell")
        whole = _in_thread(lambda: services.delete_batch(batch=Batch.objects.get(pk=batch.pk)), outcome, "batch")
        _race(one, whole, paused=cell_deleted, go_on=go_on)
    finally:
        post_delete.disconnect(dispatch_uid="concurrency-pause", sender=Analysis)
    assert sorted(outcome) == [("batch", "ok"), ("cell", "ok")], outcome
    assert (
        not Batch.with_withdrawn.filter(pk=batch.pk).exists()
        and not Analysis.objects.filter(batch_id=batch.pk).exists()
    )


@PG_ONLY
def test_failed_cells_sent_again_while_the_batch_is_deleted_is_no_deadlock(monkeypatch):
    """retry_failed_analyses locked the cells, then updated their batch; delete_batch the other way round."""
    owner = UserFactory()
    batch = _lab_batch(owner)
    batch.analyses.update(status=Analysis.Status.FAILED, error="Model unavailable")
    cells_locked, go_on, outcome = threading.Event(), threading.Event(), []

    class PausingBatch:  # services' Batch, pausing the retry as it turns from the cells to their batch
        def __getattr__(self, name):
            if name == "objects" and threading.current_thread().name == "retry" and not cells_locked.is_set():
                cells_locked.set()
                go_on.wait(10)
            return getattr(Batch, name)

    monkeypatch.setattr(services, "Batch", PausingBatch())
    retry = _in_thread(
        lambda: services.retry_failed_analyses(analyses=Analysis.objects.filter(batch_id=batch.pk)), outcome, "retry"
    )
    delete = _in_thread(lambda: services.delete_batch(batch=Batch.objects.get(pk=batch.pk)), outcome, "delete")
    _race(retry, delete, paused=cells_locked, go_on=go_on)
    assert sorted(outcome) == [("delete", "ok"), ("retry", "ok")], outcome


def _deleted_by_its_owner_as_the_review_is_checked(monkeypatch) -> None:
    """The owner's deletion of the cell commits, over a connection of its own, while the reviewer's
    save is under way: after the page looked the cell up, before the verdict is written."""
    real_check = services.check_review

    def owner_deletes_it_meanwhile(*, analysis, **kwargs):
        checked = real_check(analysis=analysis, **kwargs)
        outcome = []
        owner = _in_thread(
            lambda: services.delete_analysis(analysis=Analysis.objects.get(pk=analysis.pk)), outcome, "owner"
        )
        owner.start()
        owner.join(20)
        assert outcome == [("owner", "ok")], outcome
        return checked

    monkeypatch.setattr(services, "check_review", owner_deletes_it_meanwhile)


@PG_ONLY
def test_a_review_saved_as_its_cell_is_deleted_tells_the_reviewer(client, monkeypatch):
    """Analysis.DoesNotExist from check_not_reviewed_since, then from the page's refresh: a 500."""
    from django.contrib.auth import get_user_model

    case = classified(services.create_analysis(owner=UserFactory(), upload=upload("going.png")))
    client.force_login(get_user_model().objects.create_superuser("reviewer", password="pw-for-tests-123"))
    _deleted_by_its_owner_as_the_review_is_checked(monkeypatch)
    saved = client.post(f"/review/{case.pk}/", {"verdict": "agree", "replacing": ""}, follow=True)
    assert saved.redirect_chain[-1][0] == "/review/"
    assert "going.png was deleted while you had it open" in saved.content.decode()
    assert not Analysis.objects.filter(pk=case.pk).exists()


@PG_ONLY
def test_an_admin_review_saved_as_its_cell_is_deleted_says_so(client, monkeypatch):
    """The admin form's select_for_update().get() raised Analysis.DoesNotExist: a 500."""
    from django.contrib.auth import get_user_model

    case = classified(services.create_analysis(owner=UserFactory(), upload=upload("going.png")))
    client.force_login(get_user_model().objects.create_superuser("boss", password="pw-for-tests-123"))
    _deleted_by_its_owner_as_the_review_is_checked(monkeypatch)
    saved = client.post(
        f"/admin/diagnosis/analysis/{case.pk}/change/",
        {"review_verdict": "agree", "corrected_label": "", "review_note": "", "replacing": ""},
    )
    assert saved.status_code == 200 and "This case was deleted while you had it open" in saved.content.decode()
    assert not Analysis.objects.filter(pk=case.pk).exists()


@PG_ONLY
def test_an_admins_bulk_deletion_and_a_retry_across_the_same_batches_do_not_deadlock():
    """The admin's *Delete selected* is one transaction that deleted the batches in the list's order,
    newest first, each locked before the next; a retry across batches locks them oldest first. Run
    at once, each held the batch the other waited for: PostgreSQL killed one, and that admin got a 500."""
    owner = UserFactory()
    boss = get_user_model().objects.create_superuser("boss", password="pw-for-tests-123")
    older, newer = (services.create_batch(owner=owner, uploads=[upload(f"{n}.png")]) for n in ("old", "new"))
    Analysis.objects.update(status=Analysis.Status.FAILED, error="Model unavailable")
    newer_cell = newer.analyses.get()
    paused, go_on, outcome = threading.Event(), threading.Event(), []

    def pause_after_the_newer_batch(sender, instance, **kwargs):
        if threading.current_thread().name == "bulk" and instance.pk == newer_cell.pk:
            paused.set()  # the newer batch is locked and its cell deleted, uncommitted
            go_on.wait(10)

    def bulk_delete():
        request = RequestFactory().post("/admin/diagnosis/batch/")
        request.user = boss
        model_admin = admin.site._registry[Batch]
        model_admin.delete_queryset(request, Batch.objects.filter(pk__in=[older.pk, newer.pk]))  # newest first

    post_delete.connect(pause_after_the_newer_batch, sender=Analysis, dispatch_uid="concurrency-bulk-pause")
    try:
        bulk = _in_thread(bulk_delete, outcome, "bulk")
        retry = _in_thread(
            lambda: services.retry_failed_analyses(analyses=Analysis.objects.filter(batch__in=[older, newer])),
            outcome,
            "retry",
        )
        _race(bulk, retry, paused=paused, go_on=go_on)  # the retry, holding the older batch, waits for the newer
    finally:
        post_delete.disconnect(dispatch_uid="concurrency-bulk-pause", sender=Analysis)
    assert sorted(outcome) == [("bulk", "ok"), ("retry", "ok")], outcome
