"""State transitions: claiming is exclusive, results are recorded once, lost work is re-enqueued."""

from datetime import timedelta
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings as django_settings
from django.db import OperationalError
from django.utils import timezone

from diagnosis import inference, services
from diagnosis.models import Analysis, private_storage
from tests.factories import UserFactory, upload


@pytest.fixture
def queued(user):
    return services.create_analysis(owner=user, upload=upload())


def test_only_one_task_can_claim(queued):
    assert services.claim_analysis(analysis_id=queued.pk, task_id="a")
    assert not services.claim_analysis(analysis_id=queued.pk, task_id="b")
    # the same task, retried or redelivered, may continue its own claim
    assert services.claim_analysis(analysis_id=queued.pk, task_id="a")
    queued.refresh_from_db()
    assert queued.status == "running" and queued.attempts == 2


def test_result_is_recorded_once(queued):
    services.claim_analysis(analysis_id=queued.pk, task_id="a")
    kwargs = dict(
        analysis=queued,
        task_id="a",
        label="Uninfected",
        probability_parasitized=0.2,
        decision_threshold=0.5,
        model_version="m1",
        overlay_png=b"png",
        inference_ms=5.0,
    )
    assert services.record_result(**kwargs)
    assert not services.record_result(**{**kwargs, "label": "Parasitized", "model_version": "m2"})
    queued.refresh_from_db()
    assert (queued.status, queued.label, queued.model_version) == ("done", "Uninfected", "m1")
    assert not services.claim_analysis(analysis_id=queued.pk, task_id="a")  # done is final


def test_a_task_that_lost_its_claim_leaves_the_standing_overlay_alone(queued):
    assert services.claim_analysis(analysis_id=queued.pk, task_id="a")
    result = dict(
        analysis=queued,
        label="Uninfected",
        probability_parasitized=0.2,
        decision_threshold=0.5,
        model_version="m1",
        inference_ms=5.0,
    )
    # "a" stalled; its cell was handed to "b", which recorded its result; then "a" came back.
    Analysis.objects.filter(pk=queued.pk).update(claimed_by_task="b")
    assert services.record_result(**result, task_id="b", overlay_png=b"overlay of b")
    assert not services.record_result(**result, task_id="a", overlay_png=b"overlay of a")
    queued.refresh_from_db()
    assert queued.claimed_by_task == "b"
    with queued.overlay.open("rb") as overlay:
        assert overlay.read() == b"overlay of b"


def test_missing_weights_fail_the_analysis_saying_so_and_log_where_and_what_to_do(queued, settings, tmp_path, caplog):
    """The cell's error reaches clinicians and lab systems (the callback): the server's path and the
    operator's instructions go to the worker's log."""
    settings.MODEL_WEIGHTS = tmp_path / "absent.safetensors"
    inference.run_analyses(analysis_ids=[queued.pk], task_id="t")
    queued.refresh_from_db()
    assert queued.status == "failed" and "weights file (MODEL_WEIGHTS) is missing" in queued.error
    assert str(tmp_path) not in queued.error and queued.label == ""
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "diagnosis.analysis")
    assert "absent.safetensors" in logged and "ml.train" in logged


@pytest.mark.parametrize("damage", ["cut short while copying", "a Git LFS pointer"])
def test_damaged_weights_fail_the_analysis_at_once_saying_why(queued, settings, tmp_path, damage):
    shipped = Path(settings.MODEL_WEIGHTS).read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    if damage == "a Git LFS pointer":
        damaged.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 41943040\n")
    else:
        damaged.write_bytes(shipped[: len(shipped) // 2])
    settings.MODEL_WEIGHTS = damaged
    inference.run_analyses(analysis_ids=[queued.pk], task_id="t")
    queued.refresh_from_db()
    assert queued.status == "failed" and queued.error.startswith("Model unavailable:")
    assert "fetch the whole file again" in queued.error


def test_a_retry_after_a_database_error_does_not_use_up_an_attempt_but_a_crash_does(queued):
    def attempts() -> int:
        return Analysis.objects.get(pk=queued.pk).attempts

    assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=0) and attempts() == 1
    for retry in (1, 2, 3):  # autoretry after database errors: same task id, a higher retry count
        assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=retry)
    assert attempts() == 1
    # The worker dies and the retried message comes back with its count unchanged: that is an attempt.
    assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=3) and attempts() == 2


def test_a_database_error_on_the_last_allowed_attempt_is_retried_not_given_up(queued, settings):
    settings.ANALYSIS_MAX_ATTEMPTS = 2
    assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=0)
    assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=0)  # the worker died once
    # The last allowed attempt hits a database error while recording: the autoretry claims again.
    assert services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=1)
    retried = Analysis.objects.get(pk=queued.pk)
    assert (retried.status, retried.attempts, retried.error) == ("running", 2, "")
    # Its worker dying there is the second crash: now it is given up.
    assert not services.claim_analysis(analysis_id=queued.pk, task_id="t", retries=1)
    assert "stopped 2 times" in Analysis.objects.get(pk=queued.pk).error


def test_a_chunk_that_stopped_a_worker_is_sent_again_one_cell_per_task(user, monkeypatch):
    sent: list[tuple[list[int], int]] = []
    monkeypatch.setattr(
        services, "enqueue_analyses", lambda *, analysis_ids, per_task: sent.append((list(analysis_ids), per_task))
    )
    cells = [services.create_analysis(owner=user, upload=upload(f"{n}.png")) for n in range(3)]
    ids = [cell.pk for cell in cells]
    for pk in ids:  # the first delivery: its worker died before recording anything
        services.claim_analysis(analysis_id=pk, task_id="chunk")
    inference.run_analyses(analysis_ids=ids, task_id="chunk")  # redelivered under the same id

    assert sent == [(ids, 1)]
    states = Analysis.objects.filter(pk__in=ids).values_list("status", "claimed_by_task", "attempts")
    assert set(states) == {("queued", "", 1)}  # the splitting claim ran nothing, so it is not counted
    for pk in ids:  # each on its own: only a cell that stops its worker again uses up its attempts
        inference.run_analyses(analysis_ids=[pk], task_id=f"single-{pk}")
    assert set(Analysis.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"done"}


def test_a_cell_whose_overlay_cannot_be_drawn_fails_alone(user, monkeypatch):
    first = services.create_analysis(owner=user, upload=upload("a.png"))
    second = services.create_analysis(owner=user, upload=upload("b.png"))
    draw = inference._png_bytes
    calls = []

    def fail_the_first(rgb):
        calls.append(rgb.shape)
        if len(calls) == 1:
            raise MemoryError("cannot allocate the overlay")
        return draw(rgb)

    monkeypatch.setattr(inference, "_png_bytes", fail_the_first)
    inference.run_analyses(analysis_ids=[first.pk, second.pk], task_id="t")
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "failed" and "Cannot draw the heatmap overlay" in first.error and first.model_version
    assert second.status == "done" and second.overlay


def time_runs_out_at_call(number: int, function):
    """``function``, but the task's soft time limit strikes on its ``number``-th call, as Celery
    raises it wherever the task happens to be."""
    calls = []

    def timed(*args):
        calls.append(1)
        if len(calls) == number:
            raise SoftTimeLimitExceeded()
        return function(*args)

    return timed


def test_a_chunk_out_of_time_sends_its_unfinished_cells_back_one_by_one(user, monkeypatch):
    sent: list[tuple[list[int], int]] = []
    monkeypatch.setattr(
        services, "enqueue_analyses", lambda *, analysis_ids, per_task: sent.append((list(analysis_ids), per_task))
    )
    ids = [services.create_analysis(owner=user, upload=upload(f"{n}.png")).pk for n in range(3)]
    monkeypatch.setattr(inference, "_png_bytes", time_runs_out_at_call(2, inference._png_bytes))
    inference.run_analyses(analysis_ids=ids, task_id="chunk")
    states = dict(Analysis.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert states == {ids[0]: "done", ids[1]: "queued", ids[2]: "queued"}, "no cell is failed as unreadable"
    assert sent == [(ids[1:], 1)]
    assert set(Analysis.objects.filter(pk__in=ids[1:]).values_list("attempts", "error")) == {(0, "")}


def test_a_chunk_out_of_time_while_decoding_an_original_for_its_overlay_sends_the_rest_back(user, monkeypatch):
    from ml import preprocessing

    monkeypatch.setattr(services, "enqueue_analyses", lambda **kwargs: None)
    ids = [services.create_analysis(owner=user, upload=upload(f"{n}.png")).pk for n in range(2)]
    # Two decodings for the model, then the first overlay's.
    monkeypatch.setattr(preprocessing, "_decode", time_runs_out_at_call(3, preprocessing._decode))
    inference.run_analyses(analysis_ids=ids, task_id="chunk")
    assert set(Analysis.objects.filter(pk__in=ids).values_list("status", "error")) == {("queued", "")}


def test_a_cell_out_of_time_on_its_own_fails_saying_so(queued, monkeypatch, settings):
    from ml import preprocessing

    monkeypatch.setattr(preprocessing, "_decode", time_runs_out_at_call(1, preprocessing._decode))
    inference.run_analyses(analysis_ids=[queued.pk], task_id="alone")
    queued.refresh_from_db()
    limit = settings.CELERY_TASK_SOFT_TIME_LIMIT
    assert (queued.status, queued.error) == ("failed", f"The analysis took longer than {limit} s.")


def test_an_overlay_recorded_after_the_page_loaded_the_cell_goes_with_it(queued, django_capture_on_commit_callbacks):
    seen_by_the_page = Analysis.objects.get(pk=queued.pk)
    services.claim_analysis(analysis_id=queued.pk, task_id="t")
    inference.run_analyses(analysis_ids=[queued.pk], task_id="t")
    overlay = Path(Analysis.objects.get(pk=queued.pk).overlay.path)
    assert overlay.is_file() and not seen_by_the_page.overlay
    with django_capture_on_commit_callbacks(execute=True):
        services.delete_analysis(analysis=seen_by_the_page)
    assert not overlay.exists()


def test_the_worker_says_it_has_a_model_to_run_only_once_it_has_run_it(settings, tmp_path):
    """Its health check opened the file as safetensors only: another arch's file, or one with no
    model in it, passed, and the worker answered healthy while every cell failed."""
    settings.VAR_DIR = tmp_path
    inference.warm_up()
    ready = tmp_path / "worker-model-ready"
    assert ready.read_text().strip() == inference.get_predictor(str(settings.MODEL_WEIGHTS)).version
    settings.MODEL_WEIGHTS = tmp_path / "not-a-model.safetensors"
    settings.MODEL_WEIGHTS.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a header, no tensors
    inference.warm_up()
    assert not ready.exists()


def test_a_worker_that_may_not_write_its_marker_works_all_the_same(settings, tmp_path, caplog):
    settings.VAR_DIR = tmp_path / "not-there"  # nor writable: the marker cannot be made
    inference.warm_up()
    assert "event=model_marker_failed" in caplog.text and "event=model_warm" in caplog.text


def test_a_restarted_worker_whose_trial_run_fails_is_not_left_healthy(settings, tmp_path, monkeypatch):
    """The marker went only when loading failed: the container keeps its /data across a restart, so
    a start whose trial run failed (short of memory, say; Celery only logs the signal's error) left
    the previous start's marker, and the health check passed while every cell failed."""
    settings.VAR_DIR = tmp_path
    inference.warm_up()  # the previous start of this container
    ready = tmp_path / "worker-model-ready"
    predictor = inference.get_predictor(str(settings.MODEL_WEIGHTS))

    def out_of_memory(images):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(predictor, "predict", out_of_memory)
    with pytest.raises(RuntimeError):
        inference.warm_up()
    assert not ready.exists()


def test_the_worker_uses_the_threads_it_is_given(settings):
    import torch

    before = torch.get_num_threads()
    settings.MODEL_THREADS = 1
    try:
        inference.warm_up()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unreadable_stored_image_fails_that_analysis_only(user, settings):
    first = services.create_analysis(owner=user, upload=upload("a.png"))
    second = services.create_analysis(owner=user, upload=upload("b.png"))
    with open(first.image.path, "wb") as handle:
        handle.write(b"corrupted on disk")
    inference.run_analyses(analysis_ids=[first.pk, second.pk], task_id="t")
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "failed" and "Cannot read" in first.error
    assert second.status == "done" and second.label in ("Parasitized", "Uninfected") and second.overlay


def sending_to(sent: list):
    """enqueue_analyses as a broker that takes everything, into ``sent``."""
    return lambda *, analysis_ids: sent.extend(analysis_ids) or len(analysis_ids)


def test_sweeper_requeues_lost_work_only(user, monkeypatch):
    sent = []
    monkeypatch.setattr(services, "enqueue_analyses", sending_to(sent))
    never_sent = services.create_analysis(owner=user, upload=upload())
    stuck = services.create_analysis(owner=user, upload=upload())
    fresh = services.create_analysis(owner=user, upload=upload())
    services.claim_analysis(analysis_id=stuck.pk, task_id="dead-worker")
    services.claim_analysis(analysis_id=fresh.pk, task_id="live-worker")
    long_ago = timezone.now() - timedelta(hours=1)
    Analysis.objects.filter(pk__in=[never_sent.pk, stuck.pk]).update(created_at=long_ago, started_at=long_ago)
    Analysis.objects.filter(pk=fresh.pk).update(created_at=long_ago)

    assert services.requeue_stale_analyses(older_than=timedelta(minutes=10)) == (2, 2)
    assert sorted(sent) == sorted([never_sent.pk, stuck.pk])
    stuck.refresh_from_db()
    assert stuck.status == "queued" and stuck.claimed_by_task == ""
    assert not services.claim_analysis(analysis_id=fresh.pk, task_id="someone-else")


def test_the_sweep_command_with_older_than_zero_sends_every_queued_cell_again(user, monkeypatch):
    """After the broker came back empty: zero meant the default, so the lost cells waited ten minutes more."""
    import io

    from django.core.management import CommandError, call_command

    sent = []
    monkeypatch.setattr(services, "enqueue_analyses", sending_to(sent))
    lost = services.create_analysis(owner=user, upload=upload())
    Analysis.objects.filter(pk=lost.pk).update(enqueued_at=timezone.now() - timedelta(seconds=5))
    output = io.StringIO()
    call_command("requeue_stale_analyses", "--older-than", "0", stdout=output)
    assert output.getvalue().strip() == "re-enqueued 1 cell" and sent == [lost.pk]
    with pytest.raises(CommandError, match="--older-than -60: give an age in seconds, 0 or more"):
        call_command("requeue_stale_analyses", "--older-than", "-60", stdout=output)


def test_the_sweep_command_says_so_when_the_broker_is_still_down(user, monkeypatch):
    """Run during the incident it is for, it printed "re-enqueued 1 cell" though nothing was sent."""
    import io

    from django.core.management import CommandError, call_command

    from diagnosis import tasks

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(tasks.analyse_images, "apply_async", broker_down)
    lost = services.create_analysis(owner=user, upload=upload())
    Analysis.objects.filter(pk=lost.pk).update(created_at=timezone.now() - timedelta(hours=1))
    output = io.StringIO()
    with pytest.raises(CommandError, match="1 cell could not be sent: the broker refused or could not be reached"):
        call_command("requeue_stale_analyses", "--older-than", "0", stdout=output)
    assert output.getvalue().strip() == "re-enqueued 0 cells"
    assert Analysis.objects.get(pk=lost.pk).status == "queued"


@pytest.mark.django_db(transaction=True)  # the upload really commits, so its on-commit hook really runs
def test_a_failure_after_the_commit_keeps_the_stored_upload(user, monkeypatch):
    def database_gone(*, analysis_ids):
        raise OperationalError("database is locked")  # e.g. recording enqueued_at after the publish

    monkeypatch.setattr(services, "enqueue_analyses", database_gone)
    batch = services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")])
    for analysis in batch.analyses.all():  # committed rows, queued for the sweeper, with their files
        assert analysis.status == Analysis.Status.QUEUED and analysis.enqueued_at is None
        assert Path(analysis.image.path).is_file() and Path(analysis.thumbnail.path).is_file()


def test_a_cell_that_keeps_killing_its_worker_is_failed_not_sent_again(user, settings, monkeypatch):
    settings.ANALYSIS_MAX_ATTEMPTS = 2
    sent = []
    monkeypatch.setattr(services, "enqueue_analyses", sending_to(sent))
    poison = services.create_analysis(owner=user, upload=upload())
    # Redelivered under the same task id each time its worker dies (task_reject_on_worker_lost).
    assert services.claim_analysis(analysis_id=poison.pk, task_id="t")
    assert services.claim_analysis(analysis_id=poison.pk, task_id="t")
    assert not services.claim_analysis(analysis_id=poison.pk, task_id="t")
    poison.refresh_from_db()
    assert poison.status == "failed" and "stopped 2 times" in poison.error and poison.finished_at

    # Left running by a dead worker: the sweeper gives up on it instead of sending it again.
    stuck = services.create_analysis(owner=user, upload=upload())
    services.claim_analysis(analysis_id=stuck.pk, task_id="a")
    Analysis.objects.filter(pk=stuck.pk).update(status="queued", claimed_by_task="")  # swept once
    services.claim_analysis(analysis_id=stuck.pk, task_id="b")
    Analysis.objects.filter(pk=stuck.pk).update(started_at=timezone.now() - timedelta(hours=1))
    assert services.requeue_stale_analyses(older_than=timedelta(minutes=10)) == (0, 0) and sent == []
    stuck.refresh_from_db()
    assert stuck.status == "failed" and "Analyse it again" in stuck.error

    # Analysing it again by hand starts a fresh count.
    assert services.retry_failed_analyses(analyses=Analysis.objects.filter(pk=stuck.pk)) == [stuck.pk]
    assert services.claim_analysis(analysis_id=stuck.pk, task_id="c")


@pytest.mark.parametrize("sort", ["-probability_parasitized", "probability_parasitized"])
def test_unfinished_cells_sort_last_by_probability_on_every_database(user, sort):
    from diagnosis.selectors import AnalysisFilters, analyses_for

    probabilities = [0.9, None, 0.2, None, 0.5]
    for probability in probabilities:
        analysis = services.create_analysis(owner=user, upload=upload())
        Analysis.objects.filter(pk=analysis.pk).update(probability_parasitized=probability)
    listed = [a.probability_parasitized for a in analyses_for(user=user, filters=AnalysisFilters(sort=sort))]
    finished = sorted((p for p in probabilities if p is not None), reverse=sort.startswith("-"))
    assert listed == [*finished, None, None]


def test_the_worker_records_what_the_predictor_says_about_the_original(user, settings):
    """The worker batches model-sized copies and decodes each original again for its overlay: the
    probability and the overlay must be those of the original image."""
    import io as bytes_io

    from PIL import Image

    from ml.predictor import Predictor
    from ml.preprocessing import open_rgb
    from tests.conftest import fixture_cells

    cells = fixture_cells()
    analyses = [services.create_analysis(owner=user, upload=upload(p.name, p.read_bytes())) for p in cells]
    inference.run_analyses(analysis_ids=[a.pk for a in analyses], task_id="t")
    originals = [open_rgb(p) for p in cells]
    expected = Predictor(settings.MODEL_WEIGHTS).predict(originals)
    for analysis, original, prediction in zip(analyses, originals, expected, strict=True):
        analysis.refresh_from_db()
        assert analysis.probability_parasitized == pytest.approx(prediction.probability_parasitized, abs=1e-6)
        with analysis.overlay.open("rb") as stored:
            overlay = Image.open(bytes_io.BytesIO(stored.read()))
            assert overlay.size == original.size


def test_a_committed_uploads_files_stay_when_a_commit_hook_aborts_the_process(transactional_db, monkeypatch):
    """gunicorn aborts a request that outlives its timeout (a broker that stalls the enqueue) with
    SystemExit, which Django's robust commit hooks let through: the rows are committed by then."""

    def aborted(**kwargs):
        raise SystemExit(1)

    monkeypatch.setattr("diagnosis.services.enqueue_analyses", aborted)
    with pytest.raises(SystemExit):
        services.create_batch(owner=UserFactory(), uploads=[upload(), upload()])
    analyses = Analysis.objects.all()
    assert len(analyses) == 2 and all(a.status == "queued" for a in analyses)
    for analysis in analyses:
        assert private_storage.exists(analysis.image.name) and private_storage.exists(analysis.thumbnail.name)


def test_a_model_the_worker_cannot_load_is_not_called_a_damaged_or_wrong_file(queued, monkeypatch):
    """Out of memory in a small container is a RuntimeError too: the cell said the file did not fit
    this version of the software, and an operator could replace a good file."""
    from ml import predictor

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    inference.get_predictor.cache_clear()
    monkeypatch.setattr(predictor.Predictor, "__init__", out_of_memory)
    try:
        inference.run_analyses(analysis_ids=[queued.pk], task_id="t")
    finally:
        inference.get_predictor.cache_clear()
    queued.refresh_from_db()
    assert queued.status == "failed" and "the model could not be loaded on the server" in queued.error


def test_weights_the_worker_may_not_read_fail_the_analysis_saying_so(queued, settings, tmp_path, monkeypatch):
    """safetensors reports a file it may not open (mode 0600 for another user, a broken mount) as
    missing; the tests run as root, so the refusal is the library's own error, raised here."""
    from ml import weights

    unreadable = tmp_path / "model.safetensors"
    unreadable.write_bytes(Path(settings.MODEL_WEIGHTS).read_bytes())
    settings.MODEL_WEIGHTS = unreadable
    inference.get_predictor.cache_clear()

    def permission_denied(*args, **kwargs):
        raise FileNotFoundError("No such file or directory (os error 2)")

    monkeypatch.setattr(weights, "safe_open", permission_denied)
    inference.run_analyses(analysis_ids=[queued.pk], task_id="t")
    queued.refresh_from_db()
    assert queued.status == "failed" and queued.error.startswith("Model unavailable:")
    assert "damaged or incomplete" in queued.error and str(tmp_path) not in queued.error  # the log has it


def test_a_full_media_disk_fails_the_cell_it_struck_saying_so_and_not_the_next(user, monkeypatch):
    first, second = (services.create_analysis(owner=user, upload=upload(f"{n}.png")) for n in range(2))
    save = private_storage.save

    def disk_full_once(name, content, **kwargs):
        if name.startswith("overlays/") and not getattr(disk_full_once, "struck", False):
            disk_full_once.struck = True
            raise OSError(28, "No space left on device", f"/data/media/{name}")
        return save(name, content, **kwargs)

    monkeypatch.setattr(private_storage, "save", disk_full_once)
    inference.run_analyses(analysis_ids=[first.pk, second.pk], task_id="t")
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == "failed" and "Cannot store the heatmap overlay" in first.error
    assert "No space left on device" in first.error and "/data/media" not in first.error  # no server paths
    assert second.status == "done" and second.overlay


def test_an_original_gone_before_its_overlay_is_drawn_fails_the_cell_without_the_servers_path(
    user, media_root, monkeypatch
):
    cell = services.create_analysis(owner=user, upload=upload("cell.png"))
    open_rgb, reads = inference.open_rgb, []

    def removed_after_the_model_read_it(path):  # read once for the model, once for the overlay
        reads.append(path)
        if len(reads) == 2:
            (media_root / cell.image.name).unlink()
        return open_rgb(path)

    monkeypatch.setattr(inference, "open_rgb", removed_after_the_model_read_it)
    inference.run_analyses(analysis_ids=[cell.pk], task_id="t")
    cell.refresh_from_db()
    assert cell.status == "failed" and cell.error.startswith(
        "Cannot draw the heatmap overlay: its stored file is missing"
    )
    assert str(media_root) not in cell.error and cell.image.name not in cell.error


class _FillsUpHalfWay:
    """A file on a disk that fills as it is written: half of what it is given lands, then ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(28, "No space left on device")

    def close(self):
        self.file.close()


def test_an_upload_the_disk_filled_under_leaves_no_part_of_an_image(user, media_root, monkeypatch):
    import django.core.files.storage.filesystem as filesystem

    from tests.conftest import stored_files

    fdopen = filesystem.os.fdopen
    monkeypatch.setattr(filesystem.os, "fdopen", lambda fd, mode: _FillsUpHalfWay(fdopen(fd, mode)))
    before = set(stored_files(media_root))
    with pytest.raises(services.StorageFailed, match=r"No space left on device"):
        services.create_batch(owner=user, uploads=[upload("a.png"), upload("b.png")])
    assert not Analysis.objects.exists()
    assert set(stored_files(media_root)) == before, "half of a patient's image left until the nightly sweep"


def test_a_model_that_fails_on_a_chunk_finds_the_cell_it_fails_on(user, monkeypatch):
    sent = []
    monkeypatch.setattr(services, "enqueue_analyses", lambda *, analysis_ids, per_task: sent.append(list(analysis_ids)))
    ids = [services.create_analysis(owner=user, upload=upload(f"{n}.png")).pk for n in range(2)]
    predictor = inference.get_predictor(str(django_settings.MODEL_WEIGHTS))

    def out_of_memory(images):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(predictor, "predict", out_of_memory)
    inference.run_analyses(analysis_ids=ids, task_id="chunk")
    assert sent == [ids]  # sent back, one task each
    assert set(Analysis.objects.filter(pk__in=ids).values_list("status", "attempts", "error")) == {("queued", 0, "")}
    inference.run_analyses(analysis_ids=[ids[0]], task_id="alone")
    alone = Analysis.objects.get(pk=ids[0])
    assert alone.status == "failed" and "not enough memory" in alone.error and alone.model_version


def test_the_workers_thread_setting_holds_for_the_overlay_too(settings):
    """MODEL_THREADS shares the cores between processes: OpenCV's overlay work must keep to it too."""
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    settings.MODEL_THREADS = 1
    try:
        inference.warm_up()
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (PermissionError(13, "Permission denied"), "its stored file cannot be read (Permission denied)"),
        (OSError(5, "Input/output error"), "its stored file cannot be read (Input/output error)"),
        (MemoryError(), "the worker ran short of memory reading it"),
    ],
    ids=["permission", "io-error", "memory"],
)
def test_a_stored_image_the_worker_cannot_open_is_not_called_damaged(user, monkeypatch, failure, said):
    """Media restored under another owner, a failing disk, a worker short of memory: the file is
    fine, and 'damaged' would send an operator to replace it."""
    from ml import preprocessing

    cell = services.create_analysis(owner=user, upload=upload("a.png"))

    def cannot(stream, source):
        raise failure

    monkeypatch.setattr(preprocessing, "_decode", cannot)
    inference.run_analyses(analysis_ids=[cell.pk], task_id="t")
    cell.refresh_from_db()
    assert cell.status == "failed" and said in cell.error and "damaged" not in cell.error


def test_an_upload_gone_or_damaged_on_disk_fails_in_words_without_the_servers_paths(user, media_root, caplog):
    missing, damaged = (
        services.create_analysis(owner=user, upload=upload(f"Rahman_Amina_cell-{n}.png")) for n in range(2)
    )
    Path(missing.image.path).unlink()
    Path(damaged.image.path).write_bytes(b"not an image any more")
    inference.run_analyses(analysis_ids=[missing.pk, damaged.pk], task_id="t")
    missing.refresh_from_db()
    damaged.refresh_from_db()
    assert missing.status == damaged.status == "failed"
    assert missing.error == (
        "Cannot read the image: its stored file is missing; an administrator can find the details in the worker's log."
    )
    assert damaged.error == (
        "Cannot read the image: its stored file is damaged or no longer an image; "
        "an administrator can find the details in the worker's log."
    )  # it read "cannot identify image file <_io.BufferedReader name=...>"
    assert str(media_root) not in missing.error + damaged.error
    # The log, which outlives the cells, keeps the reason without the patient-named file.
    assert f"event=failed analysis_id={damaged.pk}" in caplog.text and "Rahman" not in caplog.text


def test_a_logged_list_of_cells_is_one_key_value_field(user, caplog, monkeypatch):
    """`event=requeue count=2 analysis_ids=[7, 8]`: the list's space split it into a field `8]` with
    no key, in a log every other line of which is key=value."""
    ids = [services.create_analysis(owner=user, upload=upload(f"{n}.png")).pk for n in range(2)]
    Analysis.objects.filter(pk__in=ids).update(enqueued_at=None, created_at=timezone.now() - timedelta(minutes=5))
    monkeypatch.setattr(services, "enqueue_analyses", lambda *, analysis_ids: len(analysis_ids))
    with caplog.at_level("INFO", logger="diagnosis.analysis"):
        services.requeue_stale_analyses()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=requeue ")]
    assert line == f"event=requeue count=2 analysis_ids={ids[0]},{ids[1]}"
