"""The staff's operations summary: counts across every user, for monitoring, and nothing more."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis import services
from diagnosis.models import Analysis
from tests.factories import UserFactory, upload


def status_for(user) -> tuple[int, dict]:
    api = APIClient()
    api.force_authenticate(user)
    response = api.get("/api/ops/status/")
    return response.status_code, response.json()


def test_staff_see_the_queue_the_last_days_work_and_the_callbacks(user, other_user):
    batch = services.create_batch(
        owner=user, uploads=[upload() for _ in range(5)], callback_url="http://127.0.0.1:9/results"
    )
    waiting = services.create_analysis(owner=other_user, upload=upload())
    now = timezone.now()
    fast, slow, broken, busy, old = batch.analyses.order_by("pk")
    seconds = lambda n: now - timedelta(seconds=n)  # noqa: E731
    done = {"status": "done", "label": "Uninfected", "finished_at": seconds(10)}
    Analysis.objects.filter(pk=fast.pk).update(**done, model_version="v1", inference_ms=20, created_at=seconds(30))
    Analysis.objects.filter(pk=slow.pk).update(**done, model_version="v2", inference_ms=40, created_at=seconds(50))
    Analysis.objects.filter(pk=broken.pk).update(status="failed", finished_at=now)
    Analysis.objects.filter(pk=busy.pk).update(status="running", started_at=seconds(400))
    Analysis.objects.filter(pk=old.pk).update(**{**done, "finished_at": now - timedelta(days=2)}, model_version="v0")
    Analysis.objects.filter(pk=waiting.pk).update(created_at=seconds(120))

    code, status = status_for(UserFactory(is_staff=True))
    assert code == 200
    assert {k: status[k] for k in ("queued", "running", "done_last_24h", "failed_last_24h")} == {
        "queued": 1,
        "running": 1,
        "done_last_24h": 2,
        "failed_last_24h": 1,
    }
    assert status["mean_inference_ms_last_24h"] == pytest.approx(30)
    assert status["mean_turnaround_seconds_last_24h"] == pytest.approx(30, abs=0.5)
    assert 119 <= status["oldest_queued_seconds"] < 180
    assert 399 <= status["oldest_running_seconds"] < 460
    assert status["model_versions_last_24h"] == ["v1", "v2"]
    Analysis.objects.filter(pk=slow.pk).update(model_version="v1")
    assert status_for(UserFactory(is_staff=True))[1]["model_versions_last_24h"] == ["v1"]  # each version once
    assert (status["callbacks_pending"], status["callbacks_failed"]) == (1, 0)
    assert not {"original_filename", "sample_reference", "owner"} & set(status)  # no patient data


def test_a_cell_queued_again_counts_as_waiting_since_it_was_sent_again(user):
    """Analysed again (a retry, or the sweeper after its worker died), a cell uploaded days ago must
    not read as days in the queue: that is the alert for no worker consuming."""
    cell = services.create_analysis(owner=user, upload=upload())
    Analysis.objects.filter(pk=cell.pk).update(
        created_at=timezone.now() - timedelta(days=2), enqueued_at=timezone.now() - timedelta(seconds=30)
    )
    assert 29 <= status_for(UserFactory(is_staff=True))[1]["oldest_queued_seconds"] < 90
    Analysis.objects.filter(pk=cell.pk).update(enqueued_at=None)  # never reached the broker: waiting since upload
    assert status_for(UserFactory(is_staff=True))[1]["oldest_queued_seconds"] >= 2 * 24 * 3600


def test_an_empty_platform_reports_zeros_and_nothing_waiting(db):
    code, status = status_for(UserFactory(is_staff=True))
    assert code == 200 and status["queued"] == status["done_last_24h"] == 0
    assert status["oldest_queued_seconds"] is None and status["mean_turnaround_seconds_last_24h"] is None
    assert status["oldest_running_seconds"] is None


def test_only_staff_may_read_it(user):
    assert status_for(user)[0] == 403
    assert APIClient().get("/api/ops/status/").status_code == 401


def test_a_sweeper_faster_than_a_task_may_run_is_flagged(settings):
    from django.core.checks import run_checks

    assert not [m for m in run_checks() if m.id == "diagnosis.W001"]
    settings.ANALYSIS_STALE_SECONDS = settings.CELERY_TASK_TIME_LIMIT
    (warning,) = [m for m in run_checks() if m.id == "diagnosis.W001"]
    assert "ANALYSIS_STALE_SECONDS" in warning.msg and "second worker" in warning.hint
