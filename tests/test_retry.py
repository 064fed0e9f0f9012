"""Failed analyses can be sent to the worker again, by their owner only; nothing else is touched."""

from pathlib import Path

import pytest
from django.db import transaction
from django.test import Client
from rest_framework.test import APIClient

from diagnosis import services
from diagnosis.models import Analysis, Batch
from tests.conftest import fixture_cells, wait_for
from tests.factories import PASSWORD, upload

FAILED_FIELDS = {
    "status": "failed",
    "error": "Model unavailable: no weights",
    "model_version": "v-old",
    "label": "",
}


@pytest.fixture
def batch(user) -> Batch:
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png"), upload("c.png")])
    batch.analyses.filter(original_filename="a.png").update(**FAILED_FIELDS, attempts=1)
    batch.analyses.filter(original_filename="b.png").update(status="done", label="Uninfected", model_version="v1")
    return batch


def by_name(batch: Batch) -> dict[str, Analysis]:
    return {a.original_filename: a for a in batch.analyses.all()}


def test_only_failed_analyses_are_queued_again_with_their_failure_cleared(batch, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as enqueued:
        retried = services.retry_failed_analyses(analyses=batch.analyses.all())
    cells = by_name(batch)
    assert retried == [cells["a.png"].pk] and len(enqueued) == 1
    again = cells["a.png"]
    assert (again.status, again.error, again.model_version, again.finished_at, again.attempts) == (
        "queued",
        "",
        "",
        None,
        0,  # a fresh count of attempts (see ANALYSIS_MAX_ATTEMPTS)
    )
    assert (cells["b.png"].status, cells["b.png"].label) == ("done", "Uninfected")  # done stays done
    assert cells["c.png"].status == "queued"
    with django_capture_on_commit_callbacks() as nothing:
        assert services.retry_failed_analyses(analyses=batch.analyses.all()) == []
    assert nothing == []


def test_the_owner_retries_on_the_pages_and_the_api_and_nobody_else_can(client, user, other_user, batch):
    cells = by_name(batch)
    failed, done = cells["a.png"], cells["b.png"]
    client.force_login(other_user)
    assert client.post(f"/analyses/{failed.pk}/retry/").status_code == 404
    assert client.post(f"/batches/{batch.pk}/retry/").status_code == 404
    assert Analysis.objects.get(pk=failed.pk).status == "failed"

    client.force_login(user)
    page = client.get(f"/batches/{batch.pk}/").content.decode()
    assert "data-retry-block>" in page and 'again (<span data-count="failed">1</span>)' in page
    assert "Analyse again" in client.get(f"/analyses/{failed.pk}/").content.decode()
    shown = client.post(f"/analyses/{failed.pk}/retry/", follow=True).content.decode()
    assert "a.png is queued for analysis again." in shown and Analysis.objects.get(pk=failed.pk).status == "queued"
    assert "has not failed" in client.post(f"/analyses/{done.pk}/retry/", follow=True).content.decode()

    Analysis.objects.filter(pk=failed.pk).update(**FAILED_FIELDS)
    api = APIClient()
    api.force_authenticate(user)
    refused = api.post(f"/api/analyses/{done.pk}/retry/")
    assert refused.status_code == 409 and "this one is Done" in refused.json()["detail"]
    accepted = api.post(f"/api/analyses/{failed.pk}/retry/")
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued"
    Analysis.objects.filter(pk=failed.pk).update(**FAILED_FIELDS)
    counts = api.post(f"/api/batches/{batch.pk}/retry-failed/").json()["counts"]
    assert counts["failed"] == 0 and counts["queued"] == 2


def test_a_batch_retry_with_no_failed_cell_is_a_409_as_a_cells_is(user, batch):
    """POST /api/batches/{id}/retry-failed/ answered 202 "Accepted" when nothing failed, as if cells
    had been queued again; the cell's own retry says 409 and why."""
    api = APIClient()
    api.force_authenticate(user)
    assert api.post(f"/api/batches/{batch.pk}/retry-failed/").status_code == 202  # a.png failed
    refused = api.post(f"/api/batches/{batch.pk}/retry-failed/")  # sent again: a.png is queued now
    assert refused.status_code == 409
    assert refused.json() == {"detail": "Only failed analyses can be tried again; this batch has none."}
    assert by_name(batch)["a.png"].status == "queued"


def test_signing_in_again_after_the_session_ended_on_a_retry_button_leads_back_and_does_nothing(
    client, user, other_user, batch
):
    """The sign-in page sends the user on to the button's URL with a GET: it was a 405 error page."""
    failed = by_name(batch)["a.png"]
    for url, page in (
        (f"/batches/{batch.pk}/retry/", f"/batches/{batch.pk}/"),
        (f"/analyses/{failed.pk}/retry/", None),
    ):
        to_sign_in = client.post(url)  # the session has ended
        assert to_sign_in.status_code == 302 and to_sign_in["Location"].startswith("/accounts/login/")
        signed_in = client.post(to_sign_in["Location"], {"username": user.username, "password": PASSWORD})
        assert signed_in["Location"] == url
        back = client.get(url, follow=True)
        assert back.redirect_chain[-1][0] == (page or f"/analyses/{failed.pk}/")
        assert "Nothing was done yet: your session had ended. Press the button again" in back.content.decode()
        assert Analysis.objects.get(pk=failed.pk).status == "failed"
        client.force_login(other_user)
        assert client.get(url).status_code == 404
        client.logout()


@pytest.mark.worker
@pytest.mark.slow
def test_a_cell_that_failed_is_analysed_after_its_cause_is_fixed_and_the_lab_hears_again(celery_worker_process, user):
    """The stored image is unreadable when the worker first gets it (as after a storage fault), then
    restored; the batch's callback goes out after each round."""
    cells = fixture_cells()[:2]
    with transaction.atomic():
        batch = services.create_batch(
            owner=user,
            uploads=[upload(p.name, p.read_bytes()) for p in cells],
            callback_url="http://127.0.0.1:9/results",  # nothing listens: every attempt fails
        )
        broken = batch.analyses.get(original_filename=cells[0].name)
        original = Path(broken.image.path).read_bytes()
        Path(broken.image.path).write_bytes(b"not an image any more")

    def finished():
        return all(a.is_finished for a in batch.analyses.all())

    wait_for(finished, timeout=120)
    broken.refresh_from_db()
    assert broken.status == "failed" and "Cannot read the image" in broken.error
    Batch.objects.filter(pk=batch.pk).update(callback_state=Batch.CallbackState.FAILED)  # as after its last attempt

    Path(broken.image.path).write_bytes(original)
    web = Client()
    web.login(username=user.username, password=PASSWORD)
    assert web.post(f"/batches/{batch.pk}/retry/").status_code == 302
    assert Batch.objects.get(pk=batch.pk).callback_state == Batch.CallbackState.PENDING  # will send again
    wait_for(finished, timeout=120)
    broken.refresh_from_db()
    assert broken.status == "done" and broken.label in ("Parasitized", "Uninfected") and broken.error == ""
    assert broken.overlay and Path(broken.overlay.path).is_file()
