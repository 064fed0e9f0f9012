"""The worker's side of an analysis: claim, classify with the model, store the overlay."""

import io
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import cv2
import torch
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from PIL import Image

from diagnosis import services
from diagnosis.models import Analysis
from ml.predictor import Predictor
from ml.preprocessing import ImageDecodeError, open_rgb, square_resize
from ml.weights import WeightsNotFound, WeightsUnreadable

logger = logging.getLogger("diagnosis.analysis")
# What loading a missing, corrupt (ml.weights.WeightsUnreadable is a ValueError) or incompatible weights file raises.
MODEL_UNAVAILABLE = (WeightsNotFound, ValueError, RuntimeError)


@lru_cache(maxsize=1)
def get_predictor(weights_path: str) -> Predictor:
    """Loaded once per worker process and reused by every task it runs."""
    predictor = Predictor(weights_path, batch_size=settings.MODEL_BATCH_SIZE)
    logger.info("event=model_loaded version=%s path=%s", predictor.version, weights_path)
    return predictor


def model_ready_file() -> Path:
    """Holds the model's version once this machine's worker has loaded it and run it once. The
    worker's health check (docker-compose.yml) reads it: a worker whose file is another arch's, or
    no model at all, answers pings, and fails every cell."""
    return Path(settings.VAR_DIR) / "worker-model-ready"


def warm_up() -> None:
    """Load the model and run it once, so the first upload after a worker starts waits for neither."""
    if settings.MODEL_THREADS > 0:  # OpenCV (the overlay) as well as torch: both share the cores
        torch.set_num_threads(settings.MODEL_THREADS)
        cv2.setNumThreads(settings.MODEL_THREADS)
    ready = model_ready_file()
    _marking_the_model_ready(ready.unlink, missing_ok=True)  # an earlier start's: it survives a restart
    try:
        predictor = get_predictor(str(settings.MODEL_WEIGHTS))
    except MODEL_UNAVAILABLE as error:
        logger.warning("event=model_unavailable error=%s", error)  # each analysis then fails saying why
        return
    size = predictor.info.config.input_size
    predictor.predict([Image.new("RGB", (size, size))])  # one that fails here leaves no marker either
    written = ready.with_name(f"{ready.name}.{os.getpid()}")  # its own: a pool's processes warm up at once
    # Whole or not at all: the health check may read it meanwhile.
    if _marking_the_model_ready(written.write_text, predictor.version + "\n"):
        _marking_the_model_ready(written.replace, ready)
    logger.info("event=model_warm version=%s", predictor.version)


def _marking_the_model_ready(step, *args, **kwargs) -> bool:
    """A VAR_DIR the worker may not write to leaves it working, unhealthy to its check, and says why."""
    try:
        step(*args, **kwargs)
    except OSError as error:
        logger.warning("event=model_marker_failed error=%s: the health check will call this worker unhealthy", error)
        return False
    return True


def run_analyses(*, analysis_ids: list[int], task_id: str, retries: int = 0) -> None:
    """Classify the cells this task can claim; ``retries`` is the task's retry count (see claim_analysis)."""
    claimed = [pk for pk in analysis_ids if services.claim_analysis(analysis_id=pk, task_id=task_id, retries=retries)]
    if not claimed:
        return
    if len(claimed) > 1 and services.has_stopped_a_worker(analysis_ids=claimed):
        services.send_separately(analysis_ids=claimed, task_id=task_id)
        return
    try:
        _classify(claimed=claimed, task_id=task_id)
    except SoftTimeLimitExceeded:
        _send_back_unfinished_cells(claimed=claimed, task_id=task_id)


def _send_back_unfinished_cells(*, claimed: list[int], task_id: str) -> None:
    """The task ran out of time (a slow host, large images): the cells it has not finished go back
    to the queue, each as a task of its own; a cell that runs out of time alone fails, saying so."""
    unfinished = list(
        Analysis.objects.filter(pk__in=claimed, status=Analysis.Status.RUNNING, claimed_by_task=task_id)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    logger.warning("event=time_limit task_id=%s unfinished=%s", task_id, unfinished)
    if len(claimed) > 1:
        services.send_separately(analysis_ids=unfinished, task_id=task_id)
        return
    limit = settings.CELERY_TASK_SOFT_TIME_LIMIT
    for pk in unfinished:
        services.fail_analysis(analysis_id=pk, task_id=task_id, error=f"The analysis took longer than {limit} s.")


def _unavailable_because(error: Exception) -> str:
    if isinstance(error, WeightsNotFound):
        problem = "the server's model weights file (MODEL_WEIGHTS) is missing"
    elif isinstance(error, WeightsUnreadable):
        problem = "the server's model weights file is damaged or incomplete: fetch the whole file again"
    else:  # a file of another version, or a worker short of memory: only the log can tell which
        problem = "the model could not be loaded on the server"
    return f"Model unavailable: {problem}. The worker's log says which file and why; analyse the cell again once fixed."


def _classify(*, claimed: list[int], task_id: str) -> None:
    try:
        predictor = get_predictor(str(settings.MODEL_WEIGHTS))
    except MODEL_UNAVAILABLE as error:
        # The path and the cause go to the log: the cell's error reaches clinicians and lab systems.
        logger.error("event=model_unavailable weights=%s error=%s", settings.MODEL_WEIGHTS, error)
        for pk in claimed:
            services.fail_analysis(analysis_id=pk, task_id=task_id, error=_unavailable_because(error))
        return

    # Only the model-sized copy of each cell is kept for the batch, and each original is decoded
    # again for its own overlay: sixteen 4096 px originals held at once would need 800 MB.
    size = predictor.info.config.input_size
    analyses, model_sized = [], []
    for analysis in Analysis.objects.filter(pk__in=claimed).order_by("pk"):
        try:
            model_sized.append(Image.fromarray(square_resize(open_rgb(analysis.image.path), size)))
            analyses.append(analysis)
        except (ImageDecodeError, FileNotFoundError) as error:
            _raise_if_time_limit(error)
            logger.warning("event=image_unreadable analysis_id=%s error=%s", analysis.pk, error)
            services.fail_analysis(
                analysis_id=analysis.pk,
                task_id=task_id,
                error=f"Cannot read the image: {_unreadable_reason(analysis, error)}",
                model_version=predictor.version,
            )
    if not analyses:
        return

    started = time.perf_counter()
    try:
        predictions = predictor.predict(model_sized)
    except Exception as error:  # noqa: BLE001 - out of memory, say: find the cell that causes it
        _raise_if_time_limit(error)
        _fail_or_send_separately(analyses=analyses, task_id=task_id, error=error, model_version=predictor.version)
        return
    per_image_ms = (time.perf_counter() - started) * 1000 / len(model_sized)
    for analysis, prediction in zip(analyses, predictions, strict=True):
        try:
            overlay_png = _png_bytes(prediction.overlay(open_rgb(analysis.image.path)))
        except Exception as error:  # noqa: BLE001 - whatever it is, it fails this cell only, not the chunk
            _fail_overlay(
                analysis, error, "Cannot draw the heatmap overlay", task_id=task_id, model_version=predictor.version
            )
            continue
        try:
            services.record_result(
                analysis=analysis,
                task_id=task_id,
                label=prediction.label,
                probability_parasitized=prediction.probability_parasitized,
                decision_threshold=predictor.info.threshold,
                model_version=predictor.version,
                overlay_png=overlay_png,
                inference_ms=per_image_ms,
            )
        except OSError as error:  # the media disk full or gone: this cell says so, the next may fit
            _fail_overlay(
                analysis, error, "Cannot store the heatmap overlay", task_id=task_id, model_version=predictor.version
            )


def _fail_overlay(analysis: Analysis, error: Exception, what: str, *, task_id: str, model_version: str) -> None:
    """This cell's overlay went wrong: the cell fails saying so; the chunk's other cells go on."""
    _raise_if_time_limit(error)
    logger.exception("event=overlay_failed analysis_id=%s", analysis.pk)
    # An OSError's own words ("No space left on device"), and a decoding error's, without the
    # server's path either names.
    reason = error.strerror if isinstance(error, OSError) and error.strerror else _unreadable_reason(analysis, error)
    services.fail_analysis(
        analysis_id=analysis.pk, task_id=task_id, error=f"{what}: {reason}", model_version=model_version
    )


def _unreadable_reason(analysis: Analysis, error: Exception) -> str:
    """Why, in the words a clinician reads on the result page: the server's paths stay in the log."""
    details = "an administrator can find the details in the worker's log."
    cause = error.__cause__  # open_rgb wraps what stopped it
    if isinstance(error, FileNotFoundError) or isinstance(cause, FileNotFoundError):
        return f"its stored file is missing; {details}"
    if isinstance(cause, MemoryError):
        return "the worker ran short of memory reading it; analyse it again, or ask an administrator."
    if isinstance(cause, OSError) and cause.strerror:  # "Permission denied", "Input/output error": not the file
        return f"its stored file cannot be read ({cause.strerror}); {details}"
    if isinstance(error, ImageDecodeError):  # it was read at upload: the copy is damaged (Pillow's words: the log)
        return f"its stored file is damaged or no longer an image; {details}"
    return str(error).replace(analysis.image.path, analysis.original_filename)


def _fail_or_send_separately(*, analyses: list[Analysis], task_id: str, error: Exception, model_version: str) -> None:
    """The model failed on a chunk: its cells go back one by one, so that only a cell it fails on
    alone is failed, with the reason (left running, they would wait for the sweeper and in the end
    be given up as if they had crashed the worker)."""
    logger.error("event=model_failed task_id=%s error=%r", task_id, error)
    if len(analyses) > 1:
        services.send_separately(analysis_ids=[a.pk for a in analyses], task_id=task_id)
        return
    (analysis,) = analyses
    services.fail_analysis(
        analysis_id=analysis.pk,
        task_id=task_id,
        error=f"The model could not classify this image: {error.__class__.__name__}: {error}",
        model_version=model_version,
    )


def _raise_if_time_limit(error: Exception) -> None:
    """Re-raise the task's soft time limit, also where open_rgb has wrapped it as a decoding error:
    running out of time is no fault of the cell."""
    if isinstance(error, SoftTimeLimitExceeded):
        raise error
    if isinstance(error.__cause__, SoftTimeLimitExceeded):
        raise error.__cause__ from None


def _png_bytes(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
