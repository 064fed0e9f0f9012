"""Uploads through the web form and the API, classified by a real Celery worker process."""

import io
import re

import pytest
from django.conf import settings
from django.test import Client
from PIL import Image
from rest_framework.test import APIClient

from diagnosis.models import Analysis
from ml.predictor import Predictor
from ml.preprocessing import open_rgb
from tests.conftest import WorkerProcess, fixture_cells, wait_for
from tests.factories import PASSWORD

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def all_finished(count: int):
    def check():
        analyses = list(Analysis.objects.order_by("pk"))
        return analyses if len(analyses) == count and all(a.is_finished for a in analyses) else None

    return check


def test_web_and_api_uploads_are_classified_by_the_worker(celery_worker_process, user):
    cells = fixture_cells()
    web = Client()
    web.login(username=user.username, password=PASSWORD)
    with open(cells[0], "rb") as first, open(cells[1], "rb") as second:
        response = web.post("/upload/", {"images": [first, second], "sample_reference": "WARD-7"})
    assert response.status_code == 302

    api = APIClient()
    token = api.post("/api/auth/token/", {"username": user.username, "password": PASSWORD}).json()["token"]
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    with open(cells[2], "rb") as handle:
        single = api.post("/api/analyses/", {"image": handle})
    assert single.status_code == 202 and single.json()["status"] == "queued"
    with open(cells[3], "rb") as a, open(cells[0], "rb") as b:
        batch = api.post("/api/batches/", {"images": [a, b]})
    assert batch.status_code == 202 and len(batch.json()["analyses"]) == 2

    analyses = wait_for(all_finished(5), timeout=120)
    sources = [cells[0], cells[1], cells[2], cells[3], cells[0]]

    predictor = Predictor(settings.MODEL_WEIGHTS)
    expected = predictor.predict([open_rgb(path) for path in sources])
    for analysis, source, prediction in zip(analyses, sources, expected, strict=True):
        assert analysis.status == "done", analysis.error
        assert analysis.original_filename == source.name
        assert analysis.label == prediction.label
        assert analysis.probability_parasitized == pytest.approx(prediction.probability_parasitized, abs=2e-3)
        assert analysis.model_version == predictor.version
        overlay = Image.open(analysis.overlay.path)
        assert overlay.size == Image.open(source).size
        assert analysis.started_at <= analysis.finished_at and analysis.inference_ms > 0

    detail = api.get(f"/api/batches/{batch.json()['id']}/").json()
    assert detail["counts"]["done"] == 2 and detail["counts"]["finished"] == 2
    item = api.get(f"/api/analyses/{single.json()['id']}/").json()
    downloaded = api.get(item["overlay_url"])
    assert downloaded.status_code == 200
    assert Image.open(io.BytesIO(b"".join(downloaded.streaming_content))).size == Image.open(cells[2]).size
    listing = api.get("/api/analyses/", {"status": "done", "label": analyses[0].label}).json()
    assert listing["count"] == sum(a.label == analyses[0].label for a in analyses)

    page = web.get(f"/analyses/{analyses[0].pk}/").content.decode()
    assert analyses[0].model_version in page and "Grad-CAM" in page


def test_redelivered_task_does_no_harm(celery_worker_process, user):
    from diagnosis.services import create_analysis, enqueue_analyses
    from tests.factories import upload

    cell = fixture_cells()[0]
    analysis = create_analysis(owner=user, upload=upload(cell.name, cell.read_bytes()))
    wait_for(all_finished(1))
    analysis.refresh_from_db()
    first = (analysis.finished_at, analysis.probability_parasitized, analysis.attempts)
    enqueue_analyses(analysis_ids=[analysis.pk])  # a duplicate message for a finished analysis
    enqueue_analyses(analysis_ids=[analysis.pk])
    probe = create_analysis(owner=user, upload=upload(cell.name, cell.read_bytes()))  # processed after them
    wait_for(all_finished(2))
    analysis.refresh_from_db()
    assert (analysis.finished_at, analysis.probability_parasitized, analysis.attempts) == first
    assert Analysis.objects.get(pk=probe.pk).status == "done"


def test_a_new_worker_warms_up_the_model_before_its_first_task(without_session_worker, media_root, tmp_path):
    """The first upload after a (re)start must not wait for the model to load; a worker without
    weights stays up, so that its analyses can fail with instructions instead of vanishing."""
    for name, env, event in (
        ("warm", {}, b"event=model_warm version="),
        ("unavailable", {"MODEL_WEIGHTS": str(tmp_path / "missing.safetensors")}, b"event=model_unavailable"),
    ):
        log = tmp_path / f"{name}.log"
        worker = WorkerProcess(media_root, log, extra_env=env).start()
        try:
            wait_for(lambda log=log, event=event: event in log.read_bytes(), timeout=60)
            assert worker.process.poll() is None, log.read_text()[-2000:]
            # In the web's key=value shape: Celery's own root logger wrote "[time: INFO/MainProcess] event=".
            assert re.search(rb"level=(INFO|WARNING) logger=diagnosis\.\w+ " + event, log.read_bytes()), log.read_text()
        finally:
            worker.stop()
