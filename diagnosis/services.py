"""Every write to analyses and batches goes through here."""

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, QuerySet, Value, When
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.utils import timezone

from diagnosis.audit import record_retention_deletion
from diagnosis.callbacks import check_callback_url, notify_deletion, notify_finished_batches, send_again
from diagnosis.models import RESULTS_NEVER_SENT, Analysis, Batch, overlay_path, private_storage
from diagnosis.text import composed, plain_line
from diagnosis.validation import ValidImage, validate_upload

GAVE_UP = (
    "The worker stopped {attempts} times while analysing this image (it crashed, ran out of memory or"
    " time), so it was given up. Analyse it again once the cause is fixed."
)
logger = logging.getLogger("diagnosis.analysis")

# Images per task message: large enough for batched forward passes, small enough to spread
# a batch over several workers.
ANALYSES_PER_TASK = 16


def logged_ids(ids: Iterable[int]) -> str:
    """Ids as one field of a key=value log line ("7,8"): a list's "[7, 8]" split into fields."""
    return ",".join(map(str, ids))


def create_batch(
    *,
    owner: AbstractBaseUser,
    uploads: Sequence[UploadedFile],
    sample_reference: str = "",
    note: str = "",
    callback_url: str = "",
    idempotency_key: str = "",
    request_digest: str = "",
    record: Callable[[Batch], None] | None = None,
) -> Batch:
    """Validate every file, then store them all as queued analyses of one batch (all or nothing).
    With a ``callback_url``, the results are POSTed there once every cell is finished. ``record``
    (the access trail's entry) runs in the same transaction: an upload the trail could not record
    is not stored, nor analysed, nor sent to a lab system."""
    if not uploads:
        raise ValidationError("Choose at least one image.")
    if len(uploads) > settings.BATCH_MAX_FILES:
        raise ValidationError(f"A batch holds at most {settings.BATCH_MAX_FILES} images; {len(uploads)} were sent.")
    if callback_url:
        check_callback_url(callback_url)
    images = _validate_all(uploads)
    with _removing_files_on_error() as stored, transaction.atomic():
        _keep_files_once_committed(stored)
        batch = Batch.objects.create(
            owner=owner,
            sample_reference=plain_line(sample_reference),
            note=composed(note).strip(),
            callback_url=callback_url,
            callback_state=Batch.CallbackState.PENDING if callback_url else Batch.CallbackState.NONE,
            idempotency_key=idempotency_key,
            request_digest=request_digest,
        )
        analyses = [_store_analysis(owner=owner, image=image, batch=batch, stored=stored) for image in images]
        if record:
            record(batch)
        transaction.on_commit(lambda: enqueue_analyses(analysis_ids=[a.pk for a in analyses]), robust=True)
    return batch


def create_batch_once(
    *,
    owner: AbstractBaseUser,
    idempotency_key: str,
    uploads: Sequence[UploadedFile],
    sample_reference: str = "",
    note: str = "",
    callback_url: str = "",
    record: Callable[[Batch], None] | None = None,
) -> tuple[Batch, bool]:
    """create_batch for a client that may send a request again when its response was lost: the
    first request under a key makes the batch (True); the same request again gets that batch back
    (False). The key sent with another request, or of a batch withdrawn from its lab system, is
    refused; the key of a batch deleted outright is free again, with the batch's record."""
    request = {"sample_reference": sample_reference, "note": note, "callback_url": callback_url}
    digest = request_digest(uploads=uploads, **request)
    earlier = _batch_made_under(owner=owner, idempotency_key=idempotency_key)
    if earlier is None:
        try:
            batch = create_batch(
                owner=owner,
                uploads=uploads,
                idempotency_key=idempotency_key,
                request_digest=digest,
                record=record,
                **request,
            )
            return batch, True
        except IntegrityError:  # the same request, sent twice at once: the other one made it
            earlier = _batch_made_under(owner=owner, idempotency_key=idempotency_key)
            if earlier is None:
                raise
    if earlier.request_digest != digest:
        raise KeyReused(f"The Idempotency-Key {idempotency_key!r} was sent before with another request.")
    if earlier.withdrawn_at:
        raise KeyReused(f"The batch made under the Idempotency-Key {idempotency_key!r} has been deleted.")
    return earlier, False


class KeyReused(ValidationError):
    pass


def _batch_made_under(*, owner: AbstractBaseUser, idempotency_key: str) -> Batch | None:
    return Batch.with_withdrawn.filter(owner=owner, idempotency_key=idempotency_key).first()


def request_digest(*, uploads: Sequence[UploadedFile], sample_reference: str, note: str, callback_url: str) -> str:
    """SHA-256 of what a batch request carries: its fields, and each file's name and bytes in order."""
    digest = hashlib.sha256(json.dumps([sample_reference, note, callback_url]).encode())
    for upload in uploads:
        digest.update(json.dumps(upload.name).encode())
        content = hashlib.sha256()
        for chunk in upload.chunks():
            content.update(chunk)
        upload.seek(0)  # validation reads it again
        digest.update(content.digest())
    return digest.hexdigest()


def create_analysis(
    *, owner: AbstractBaseUser, upload: UploadedFile, record: Callable[[Analysis], None] | None = None
) -> Analysis:
    """Store one image as a queued analysis; ``record`` in the same transaction, as for create_batch."""
    (image,) = _validate_all([upload])
    with _removing_files_on_error() as stored, transaction.atomic():
        _keep_files_once_committed(stored)
        analysis = _store_analysis(owner=owner, image=image, batch=None, stored=stored)
        if record:
            record(analysis)
        transaction.on_commit(lambda: enqueue_analyses(analysis_ids=[analysis.pk]), robust=True)
    return analysis


class FilesRefused(ValidationError):
    """Some uploads are not images the model can take; ``refused`` pairs each one's position in
    the request with why, so a page can keep the others for the next attempt."""

    def __init__(self, refused: list[tuple[int, str]]):
        super().__init__([message for _, message in refused])
        self.refused = refused


class StorageFailed(Exception):
    """The upload's files could not be written (the disk full, the folder not writable): nothing was
    stored, and the client is told so, not that the server failed and the upload may be there."""


def _storage_failed(error: OSError) -> StorageFailed:
    reason = error.strerror or str(error)  # not the file's path
    logger.error("event=storage_failed error=%r: uploads cannot be stored", reason)
    return StorageFailed(
        f"The server could not store the images ({reason}): tell the lab's IT that its storage is full "
        "or cannot be written."
    )


def _validate_all(uploads: Iterable[UploadedFile]) -> list[ValidImage]:
    valid, refused = [], []
    for position, upload in enumerate(uploads):
        try:
            valid.append(validate_upload(upload))
        except ValidationError as error:
            refused.append((position, " ".join(error.messages)))
        except OSError as error:  # a picture past 1 MB is spooled to disk (Pillow's own errors are refusals)
            raise _storage_failed(error) from error
    if refused:
        raise FilesRefused(refused)
    return valid


@contextmanager
def _removing_files_on_error() -> Iterator[list[str]]:
    """Collects names of stored files and deletes them if the block fails, so nothing is half-stored."""
    stored: list[str] = []
    try:
        yield stored
    except BaseException:
        for name in stored:
            private_storage.delete(name)
        raise


def _keep_files_once_committed(stored: list[str]) -> None:
    """Registered first, so it runs first at commit: from then on the files are the committed
    rows', and nothing a later commit hook raises (a worker process aborted while the broker
    stalls raises SystemExit, which even a robust hook lets through) may delete them."""
    transaction.on_commit(stored.clear)


def _store_analysis(*, owner, image: ValidImage, batch: Batch | None, stored: list[str]) -> Analysis:
    analysis = Analysis(owner=owner, batch=batch, original_filename=image.name, width=image.width, height=image.height)
    try:
        analysis.image.save("upload.png", image.picture_png, save=False)
        stored.append(analysis.image.name)
        analysis.thumbnail.save("thumb.png", ContentFile(image.thumbnail_png), save=False)
        stored.append(analysis.thumbnail.name)
    except OSError as error:
        raise _storage_failed(error) from error
    analysis.save()
    log_transition(analysis=analysis, event="queued")
    return analysis


def enqueue_analyses(*, analysis_ids: Sequence[int], per_task: int = ANALYSES_PER_TASK) -> int:
    """Send analyses to the worker; returns how many were sent. If the broker is unreachable the
    rest stay queued for the sweeper."""
    from diagnosis.tasks import analyse_images  # here, not at the top: tasks imports this module

    for start in range(0, len(analysis_ids), per_task):
        chunk = list(analysis_ids[start : start + per_task])
        try:
            analyse_images.apply_async(args=[chunk], retry=True)
        except Exception:  # noqa: BLE001 - any broker failure must not lose the upload
            # The rest would wait out the same connection timeout each: the sweeper sends them all.
            rest = logged_ids(analysis_ids[start:])
            logger.warning("event=enqueue_failed analysis_ids=%s; the sweeper will retry", rest, exc_info=True)
            return start
        Analysis.objects.filter(pk__in=chunk, status=Analysis.Status.QUEUED).update(enqueued_at=timezone.now())
    return len(analysis_ids)


def claim_analysis(*, analysis_id: int, task_id: str, retries: int = 0) -> bool:
    """Move queued -> running for this task. A task retried or redelivered under the same id may
    claim again; any other task (a duplicate) gets False and must do nothing. ``retries`` is the
    task's retry count: claiming again with a higher one is a retry after a database error, which
    does not count as an attempt; with the same one, the message came back because the worker died,
    which does. A cell whose worker has died on it ANALYSIS_MAX_ATTEMPTS times (an image that
    exhausts memory, say) is failed instead, so it cannot block the queue for ever."""
    own_claim = Analysis.objects.filter(pk=analysis_id, status=Analysis.Status.RUNNING, claimed_by_task=task_id)
    if _give_up(own_claim.filter(claimed_at_retry__gte=retries)):  # a redelivery; an error retry is no crash
        return False
    claimable = Q(status=Analysis.Status.QUEUED) | Q(status=Analysis.Status.RUNNING, claimed_by_task=task_id)
    retried_after_an_error = Q(status=Analysis.Status.RUNNING, claimed_at_retry__lt=retries)
    claimed = Analysis.objects.filter(claimable, pk=analysis_id).update(
        status=Analysis.Status.RUNNING,
        claimed_by_task=task_id,
        claimed_at_retry=retries,
        started_at=timezone.now(),
        attempts=F("attempts") + Case(When(retried_after_an_error, then=Value(0)), default=Value(1)),
    )
    if claimed:
        logger.info("event=running analysis_id=%s task_id=%s", analysis_id, task_id)
    return bool(claimed)


def has_stopped_a_worker(*, analysis_ids: Sequence[int]) -> bool:
    """Whether any of these cells is on its second attempt or later: an earlier task died on it."""
    return Analysis.objects.filter(pk__in=analysis_ids, attempts__gt=1).exists()


def send_separately(*, analysis_ids: Sequence[int], task_id: str) -> None:
    """running -> queued for this task's cells, each sent again as a task of its own, so that only
    the cell that stops a worker (an image too large for memory, say) uses up its attempts."""
    Analysis.objects.filter(pk__in=analysis_ids, status=Analysis.Status.RUNNING, claimed_by_task=task_id).update(
        status=Analysis.Status.QUEUED,
        claimed_by_task="",
        enqueued_at=None,
        attempts=F("attempts") - 1,  # this claim ran nothing: only the crashes count
    )
    logger.info("event=split analysis_ids=%s task_id=%s", logged_ids(analysis_ids), task_id)
    enqueue_analyses(analysis_ids=analysis_ids, per_task=1)


def record_result(
    *,
    analysis: Analysis,
    task_id: str,
    label: str,
    probability_parasitized: float,
    decision_threshold: float,
    model_version: str,
    overlay_png: bytes,
    inference_ms: float,
) -> bool:
    """running -> done, once: a second recording of the same analysis changes nothing."""
    storage = analysis.overlay.storage
    with transaction.atomic():
        # The row stays locked while the overlay is written, so a task that has lost its claim (or
        # a redelivery after the result is in) never replaces the overlay of the result that stands.
        claimed = Analysis.objects.select_for_update().filter(
            pk=analysis.pk, status=Analysis.Status.RUNNING, claimed_by_task=task_id
        )
        if not claimed.values_list("pk", flat=True):
            return False  # deleted, finished or claimed by another task meanwhile: nothing is written
        storage.delete(overlay_path(analysis.pk))  # a crashed earlier attempt may have left it
        result = {
            "status": Analysis.Status.DONE,
            "label": label,
            "probability_parasitized": probability_parasitized,
            "decision_threshold": decision_threshold,
            "model_version": model_version,
            "overlay": storage.save(overlay_path(analysis.pk), ContentFile(overlay_png)),
            "inference_ms": inference_ms,
            "finished_at": timezone.now(),
            "error": "",
        }
        claimed.update(**result)
    # Not read back: the owner may delete the cell the moment the lock is released.
    for field, value in result.items():
        setattr(analysis, field, value)
    log_transition(analysis=analysis, event="done")
    return True


def fail_analysis(*, analysis_id: int, task_id: str, error: str, model_version: str = "") -> bool:
    failed = Analysis.objects.filter(pk=analysis_id, status=Analysis.Status.RUNNING, claimed_by_task=task_id).update(
        status=Analysis.Status.FAILED, error=error[:2000], model_version=model_version, finished_at=timezone.now()
    )
    if failed:
        # The reason the owner reads may name their file, often after the patient: the log, kept
        # past every deletion, does not.
        name = Analysis.objects.filter(pk=analysis_id).values_list("original_filename", flat=True).first()
        # (A name of a few letters names no one, and replaced would garble every word holding it.)
        logged = error.replace(name, "<file name>") if name and len(name) > 5 else error
        logger.warning("event=failed analysis_id=%s error=%r", analysis_id, logged[:200])
    return bool(failed)


def _give_up(running: QuerySet[Analysis]) -> int:
    """running -> failed for those of ``running`` that have used up their attempts."""
    exhausted = running.filter(status=Analysis.Status.RUNNING, attempts__gte=settings.ANALYSIS_MAX_ATTEMPTS)
    ids = list(exhausted.values_list("pk", flat=True))
    if ids:
        Analysis.objects.filter(pk__in=ids, status=Analysis.Status.RUNNING).update(
            status=Analysis.Status.FAILED,
            error=GAVE_UP.format(attempts=settings.ANALYSIS_MAX_ATTEMPTS),
            finished_at=timezone.now(),
        )
        logger.warning("event=gave_up analysis_ids=%s", logged_ids(ids))
    return len(ids)


class Requeued(NamedTuple):
    found: int  # stale cells, queued again
    sent: int  # of those, sent to the broker (the rest wait for the next sweep)


def requeue_stale_analyses(*, older_than: timedelta | None = None) -> Requeued:
    """Re-enqueue analyses whose task was lost: queued but never sent (broker down) or sent long
    ago, and running for longer than a task can take (worker died), unless they have used up
    their attempts (then they fail)."""
    older_than = timedelta(seconds=settings.ANALYSIS_STALE_SECONDS) if older_than is None else older_than
    cutoff = timezone.now() - older_than
    with transaction.atomic():
        stale_running = Analysis.objects.select_for_update(skip_locked=True).filter(
            status=Analysis.Status.RUNNING, started_at__lt=cutoff
        )
        _give_up(stale_running)
        running_ids = list(stale_running.values_list("pk", flat=True))
        Analysis.objects.filter(pk__in=running_ids, status=Analysis.Status.RUNNING).update(
            status=Analysis.Status.QUEUED, claimed_by_task=""
        )
    queued_ids = list(
        Analysis.objects.filter(status=Analysis.Status.QUEUED)
        .filter(
            Q(enqueued_at__isnull=True, created_at__lt=timezone.now() - timedelta(seconds=5))
            | Q(enqueued_at__lt=cutoff)
        )
        .values_list("pk", flat=True)
    )
    ids = sorted(set(running_ids) | set(queued_ids))
    if not ids:
        return Requeued(found=0, sent=0)
    logger.info("event=requeue count=%s analysis_ids=%s", len(ids), logged_ids(ids))
    return Requeued(found=len(ids), sent=enqueue_analyses(analysis_ids=ids))


def lock_batches(*, batch_ids: Iterable[int | None]) -> None:
    """Lock batch rows before any of their cells, in every transaction that writes both: delete_batch
    locks its batch, then its cells, and the other order deadlocks against it on PostgreSQL."""
    ids = sorted({pk for pk in batch_ids if pk is not None})  # in one order, against each other too
    if ids:
        list(Batch.with_withdrawn.select_for_update().filter(pk__in=ids).order_by("pk").values_list("pk", flat=True))


def retry_failed_analyses(*, analyses: QuerySet[Analysis]) -> list[int]:
    """failed -> queued for those of ``analyses`` that failed (the model file was missing, the
    image unreadable until restored, a worker kept dying): result fields cleared, sent to the
    worker again. Others are left alone. A batch whose callback has gone out (or given up) is set
    to send again, so the lab system gets the new results. Returns the ids queued again."""
    failed = Analysis.Status.FAILED
    with transaction.atomic():
        lock_batches(batch_ids=analyses.filter(status=failed).values_list("batch_id", flat=True))
        ids = list(analyses.select_for_update(of=("self",)).filter(status=failed).values_list("pk", flat=True))
        Analysis.objects.filter(pk__in=ids, status=failed).update(
            status=Analysis.Status.QUEUED,
            error="",
            label="",
            probability_parasitized=None,
            decision_threshold=None,
            model_version="",
            inference_ms=None,
            claimed_by_task="",
            attempts=0,
            enqueued_at=None,
            started_at=None,
            finished_at=None,
        )
        batch_ids = Analysis.objects.filter(pk__in=ids).values_list("batch_id", flat=True)
        # Their results are withdrawn until analysed again: no cell's own time says so.
        Batch.objects.filter(pk__in=batch_ids).update(results_changed_at=timezone.now())
        send_again(batch_ids=batch_ids)
        if ids:
            logger.info("event=retry analysis_ids=%s", logged_ids(ids))
            transaction.on_commit(lambda: enqueue_analyses(analysis_ids=ids), robust=True)
    return ids


def delete_analysis(*, analysis: Analysis, record: Callable[[Analysis], None] | None = None) -> None:
    """Remove an analysis for good, its image, thumbnail and heatmap included (see signals). Its
    batch's ``results_as_of`` moves on, and a batch with a callback is sent again without it: an
    attempt may be on its way with it, or have reached the lab system unconfirmed. ``record`` (the
    access trail's entry) runs in the same transaction: a deletion that fails is not recorded as done."""
    logger.info("event=deleted analysis_id=%s owner_id=%s", analysis.pk, analysis.owner_id)
    with transaction.atomic():
        lock_batches(batch_ids=[analysis.batch_id])
        if record:
            record(analysis)  # while it still has its id
        analysis.delete()
        batch = Batch.objects.filter(pk=analysis.batch_id)
        batch.update(results_changed_at=timezone.now())
        if batch.exclude(callback_state=Batch.CallbackState.NONE).exists():
            send_again(batch_ids=[analysis.batch_id])  # an attempt under way loses its lease
            transaction.on_commit(lambda: notify_deletion(batch_id=analysis.batch_id), robust=True)


def delete_batch(*, batch: Batch, record: Callable[[Batch, int], None] | None = None) -> None:
    """Remove a batch with every analysis in it and their files. If its results may have reached
    its lab system (delivered, or an attempt made: delivery is at least once), the batch is kept,
    empty and hidden, until the lab system is told they are withdrawn. ``record`` is given the batch
    and how many cells go with it, in the same transaction, as for delete_analysis."""
    ids = list(batch.analyses.values_list("pk", flat=True))
    logger.info("event=deleted batch_id=%s owner_id=%s analysis_ids=%s", batch.pk, batch.owner_id, logged_ids(ids))
    with transaction.atomic():
        # Locked, so an attempt cannot claim it between this look and the deletion. Gone by then (a
        # second click, a DELETE retried after a timeout) is the caller's 404, as if it came later.
        current = get_object_or_404(Batch.with_withdrawn.select_for_update(), pk=batch.pk)
        if current.withdrawn_at and current.callback_state == Batch.CallbackState.PENDING:
            # Deleted already (by a click just before, or its owner while an admin looked at it): its
            # row is what tells the lab system, so it stays until that is delivered.
            raise Http404
        if record:  # counted under the lock: a cell deleted meanwhile has an entry of its own
            record(batch, current.analyses.count())
        if current.withdrawn_at or not current.results_may_have_reached:  # a withdrawal given up on, or nothing sent
            current.delete()
            return
        current.analyses.all().delete()
        _withdraw(batch_ids=[batch.pk])


def withdraw_batches_of_removed_users() -> None:
    """After a user's account is removed, which takes their cells and leaves their batches without
    an owner: as delete_batch, each batch whose results may have reached its lab system is kept,
    empty, until the lab system is told they are withdrawn; the others go."""
    ownerless = Batch.with_withdrawn.filter(owner__isnull=True, withdrawn_at__isnull=True)
    # As there: delivery is at least once, so an attempt made, confirmed or not, may have been stored.
    ownerless.filter(RESULTS_NEVER_SENT).delete()
    _withdraw(batch_ids=list(ownerless.values_list("pk", flat=True)))


def _withdraw(*, batch_ids: list[int]) -> None:
    # The note may name the patient and the lab system has no use for it; the sample reference
    # stays, as the lab system's key to the results it withdraws.
    Batch.with_withdrawn.filter(pk__in=batch_ids).update(withdrawn_at=timezone.now(), note="")
    send_again(batch_ids=batch_ids)  # an attempt under way loses its lease
    for batch_id in batch_ids:
        transaction.on_commit(partial(notify_deletion, batch_id=batch_id), robust=True)


def delete_expired_analyses(*, older_than: timedelta) -> int:
    """Delete analyses uploaded longer ago than ``older_than`` (files included), and the batches
    this leaves empty. Returns how many analyses went."""
    if older_than <= timedelta(0):
        raise ValueError(f"a retention period must be positive, not {older_than}")  # it would delete everything
    cutoff = timezone.now() - older_than
    expired = Analysis.objects.filter(created_at__lt=cutoff)
    deleted = 0
    # In chunks: each deletion loads its rows to remove their files, so memory stays bounded.
    while listed := list(expired.values_list("pk", flat=True)[:500]):
        with transaction.atomic():  # gone with its entries in the access trail, or not at all
            # The cells still here, locked: another run at once (beat's, and one by hand) may have
            # deleted and recorded some since they were listed.
            cells = list(
                Analysis.objects.select_for_update().filter(pk__in=listed).values_list("pk", "batch_id", "owner_id")
            )
            deleted += (
                Analysis.objects.filter(pk__in=[pk for pk, _, _ in cells]).delete()[1].get(Analysis._meta.label, 0)
            )
            record_retention_deletion(cells=cells, older_than_days=older_than.days)
    # Withdrawn batches too, once their withdrawal is no longer being tried (an admin can retry one
    # that failed).
    emptied = Batch.with_withdrawn.filter(created_at__lt=cutoff, analyses__isnull=True)
    emptied.exclude(withdrawn_at__isnull=False, callback_state=Batch.CallbackState.PENDING).delete()
    if deleted:
        logger.info("event=retention_deleted count=%s older_than_days=%s", deleted, older_than.days)
    return deleted


# Where analyses' files are stored (flat folders of private_storage), and the field naming each.
FILE_FOLDERS = {"uploads": "image", "thumbnails": "thumbnail", "overlays": "overlay"}


def delete_orphaned_files(*, older_than: timedelta) -> int:
    """Delete stored files that no analysis names, written longer ago than ``older_than`` (an upload
    still being stored has files and no committed row yet). An upload process killed mid-batch (a
    redeploy, the out-of-memory killer) rolls its rows back but cannot remove the files it wrote:
    patient images nothing else would ever find. Returns how many went."""
    cutoff = timezone.now() - older_than
    deleted = 0
    for folder, field in FILE_FOLDERS.items():
        if not private_storage.exists(folder):
            continue
        # A folder at a time and a thousand files at a time, each looked up by name: millions of
        # files and rows are never held in memory at once.
        with os.scandir(private_storage.path(folder)) as entries:
            files = (entry for entry in entries if entry.is_file())
            while chunk := list(islice(files, 1000)):
                deleted += _delete_unnamed(folder=folder, field=field, files=chunk, cutoff=cutoff)
    deleted += _delete_abandoned_spools(cutoff=cutoff)
    if deleted:
        logger.info("event=orphaned_files_deleted count=%s", deleted)
    return deleted


def _delete_abandoned_spools(*, cutoff: datetime) -> int:
    """Large uploads spooled to FILE_UPLOAD_TEMP_DIR by a process killed while reading them:
    nothing names them, and a request still being read keeps writing (and so dating) its own."""
    deleted = 0
    if not os.path.isdir(settings.FILE_UPLOAD_TEMP_DIR):  # removed with the media (a restore, say)
        return 0
    with os.scandir(settings.FILE_UPLOAD_TEMP_DIR) as entries:
        for entry in entries:
            try:
                if entry.is_file() and datetime.fromtimestamp(entry.stat().st_mtime, tz=UTC) < cutoff:
                    os.unlink(entry.path)
                    deleted += 1
            except FileNotFoundError:  # stored or cleaned up by its request since the listing
                continue
    return deleted


def _delete_unnamed(*, folder: str, field: str, files: list[os.DirEntry], cutoff: datetime) -> int:
    names = [f"{folder}/{entry.name}" for entry in files]
    named = set(Analysis.objects.filter(**{f"{field}__in": names}).order_by().values_list(field, flat=True))
    if folder == "overlays":  # an overlay is found by its analysis's id as well
        ids = [int(entry.name.removesuffix(".png")) for entry in files if entry.name.removesuffix(".png").isdigit()]
        named |= {overlay_path(pk) for pk in Analysis.objects.filter(pk__in=ids).values_list("pk", flat=True)}
    deleted = 0
    for name in names:
        try:
            orphaned = name not in named and private_storage.get_modified_time(name) < cutoff
        except FileNotFoundError:  # deleted with its analysis since the listing
            continue
        if orphaned:
            private_storage.delete(name)
            deleted += 1
    return deleted


def check_review(*, analysis: Analysis, verdict: str, corrected_label: str) -> str:
    """Validate a verdict; returns the corrected label to store ("" when agreeing)."""
    if analysis.status != Analysis.Status.DONE:
        raise ValidationError("Only finished analyses can be reviewed.")
    if verdict == Analysis.Verdict.AGREE:
        # The reviewer changed their mind one way or the other: which one is not for this code to guess.
        if corrected_label and corrected_label != analysis.label:
            contradicts = "You agreed with the model but chose another label: choose Disagree, or clear the label."
            raise ValidationError({"corrected_label": contradicts})
        return ""
    if verdict != Analysis.Verdict.DISAGREE:
        raise ValidationError("The verdict must be agree or disagree.")
    if corrected_label not in Analysis.Label.values or corrected_label == analysis.label:
        # Against the field, so the form marks the label's select with it (a screen reader hears why).
        raise ValidationError(
            {"corrected_label": "A disagreement needs the corrected label (the one the model did not give)."}
        )
    return corrected_label


def lock_for_review(*, analysis: Analysis) -> Analysis | None:
    """The case as it is now, locked with its batch (first, as every writer of both) until the
    transaction commits, for a review to be checked against and saved; None if it was deleted."""
    lock_batches(batch_ids=[analysis.batch_id])
    return Analysis.objects.select_for_update().filter(pk=analysis.pk).first()


def review_analysis(
    *,
    analysis: Analysis,
    reviewer: AbstractBaseUser,
    verdict: str,
    corrected_label: str = "",
    note: str = "",
    replacing: datetime | None,
) -> Analysis:
    """Record a reviewer's verdict. ``replacing`` is the review time the reviewer saw (None: none yet):
    if someone else has reviewed the case since, nothing is saved and the error says who."""
    corrected = check_review(analysis=analysis, verdict=verdict, corrected_label=corrected_label)
    changes = {
        "review_verdict": verdict,
        "corrected_label": corrected,
        "review_note": note.strip(),
        "reviewed_by": reviewer,
        "reviewer_name": reviewer.get_username(),
        "reviewed_at": timezone.now(),
    }
    # With the re-send to the lab system, or not at all: a correction it is never sent would leave
    # it holding the model's call.
    with transaction.atomic():
        lock_batches(batch_ids=[analysis.batch_id])  # send_again below writes it
        if not Analysis.objects.filter(pk=analysis.pk, reviewed_at=replacing).update(**changes):
            check_not_reviewed_since(analysis_id=analysis.pk, replacing=replacing)
            raise ValidationError(  # its review is back as seen
                "The case changed while you had it open; save again.", code=REVIEW_CONFLICT
            )
        if analysis.batch_id:  # a lab system that was sent the batch's results is sent the reviewed ones
            send_again(batch_ids=[analysis.batch_id])
            transaction.on_commit(lambda: notify_finished_batches(analysis_ids=[analysis.pk]), robust=True)
    for name, value in changes.items():
        setattr(analysis, name, value)
    logger.info("event=reviewed analysis_id=%s verdict=%s reviewer_id=%s", analysis.pk, verdict, reviewer.pk)
    return analysis


# The code of a refusal because someone else's review was saved meanwhile: the form then carries
# that review's time, the one a save after reading it replaces.
REVIEW_CONFLICT = "review_conflict"


def check_not_reviewed_since(*, analysis_id: int, replacing: datetime | None) -> None:
    """Raise, saying who and when, if the case's review is no longer the one the reviewer saw
    (``replacing``: its review time then, None for no review)."""
    current = Analysis.objects.select_related("reviewed_by").filter(pk=analysis_id).first()
    if current is None:  # deleted by its owner as the reviewer saved
        raise ValidationError("This case was deleted while you had it open: there is nothing left to review.")
    if current.reviewed_at == replacing:
        return
    if current.reviewed_at is None:
        raise ValidationError(
            "The review of this case was withdrawn while you had it open; save again.", code=REVIEW_CONFLICT
        )
    who = current.reviewer or "Someone"
    raise ValidationError(
        f"{who} reviewed this case at {timezone.localtime(current.reviewed_at):%Y-%m-%d %H:%M} while you had "
        f"it open ({current.get_review_verdict_display()}). Read their review; save again to replace it.",
        code=REVIEW_CONFLICT,
    )


def log_transition(*, analysis: Analysis, event: str) -> None:
    timings = ""
    if analysis.finished_at:
        total = (analysis.finished_at - analysis.created_at).total_seconds()
        timings = f" total_s={total:.3f} inference_ms={analysis.inference_ms or 0:.1f}"
    logger.info("event=%s analysis_id=%s owner_id=%s%s", event, analysis.pk, analysis.owner_id, timings)
