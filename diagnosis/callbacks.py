"""Batch callbacks: a lab system sends a URL with a batch and is POSTed the results once every cell
is finished, instead of polling.

Only hosts named in CALLBACK_ALLOWED_HOSTS can be called (the server must not be made to reach
arbitrary addresses; the list is checked again before every attempt, so removing a host stops
its deliveries), redirects are not followed, and each body is signed with HMAC-SHA256 under
CALLBACK_SECRET (``X-Malaria-Signature: sha256=<hex>``), without which callbacks are off. Delivery
is at least once: an attempt is claimed with a conditional update that also sets a lease, so a
duplicate task does nothing, and a failed attempt is tried again by the sweeper after 1, 2, 4, ...
minutes (an hour at most), up to CALLBACK_MAX_ATTEMPTS. Each attempt whose body went out is in
the access trail, whatever the receiver answered: it may have kept the results. The state moves
pending -> delivered, or pending -> failed; an attempt records its outcome only while it still
holds its lease, so a restart (cells analysed again) while it is under way makes the batch go out
again once those cells are finished. Results
that may have reached the lab system and are then deleted are withdrawn there: a cell deleted
sends the batch again without it, a batch deleted sends ``batch.withdrawn`` (diagnosis.services).
"""

import hashlib
import hmac
import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from rest_framework.fields import DateTimeField

from diagnosis import selectors
from diagnosis.audit import record_callback
from diagnosis.models import Analysis, Batch

logger = logging.getLogger("diagnosis.callbacks")

LEASE = timedelta(minutes=5)  # longer than an attempt can take (TIMEOUT_SECONDS)
TIMEOUT_SECONDS = 10
LONGEST_PAUSE_MINUTES = 60
UNFINISHED = (Analysis.Status.QUEUED, Analysis.Status.RUNNING)
DEFAULT_PORTS = {"http": 80, "https": 443}


def _allowed_destinations() -> set[tuple[str, int | None]]:
    """CALLBACK_ALLOWED_HOSTS as (host, port) pairs: "lis01" takes any port of it, "lis01:8443"
    that one only, so the worker cannot be pointed at the host's other services."""
    allowed = set()
    for entry in (entry.lower().strip() for entry in settings.CALLBACK_ALLOWED_HOSTS):
        host, colon, port = entry.rpartition(":")
        # An IPv6 address takes a port in brackets only: "2001:db8::1:8443" is an address.
        if colon and port.isascii() and port.isdigit() and (":" not in host or host[:1] + host[-1:] == "[]"):
            allowed.add((host.strip("[]"), int(port)))
        else:
            allowed.add((entry.strip("[]"), None))
    return allowed


def check_callback_url(url: str) -> str:
    """The URL if this server may call it, else a ValidationError saying why."""
    allowed = _allowed_destinations()
    if not allowed:
        raise ValidationError("Callbacks are not enabled on this server (CALLBACK_ALLOWED_HOSTS is empty).")
    if not settings.CALLBACK_SECRET:
        raise ValidationError("Callbacks are not enabled on this server (CALLBACK_SECRET is not set).")
    if not url.isascii():  # http.client cannot send it: every attempt would fail the same way
        raise ValidationError("The callback URL must be plain ASCII: percent-encode other characters.")
    try:
        parts = urlsplit(url)
    except ValueError:  # a "[" or "]" that opens or closes no IPv6 address ("Invalid IPv6 URL")
        raise ValidationError("The callback URL is not a valid URL: a bracket outside an IPv6 address.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("The callback URL must be an http or https URL.")
    if any(char <= " " or char == "\x7f" for char in url):  # nor these, and its refusal echoes the path
        raise ValidationError("The callback URL must not contain spaces or control characters: percent-encode them.")
    if parts.scheme == "http" and not settings.CALLBACK_ALLOW_HTTP:
        raise ValidationError(
            "The callback URL must be https: the results name patients' samples "
            "(CALLBACK_ALLOW_HTTP allows plain http on a trusted network)."
        )
    if parts.username is not None or parts.password is not None:
        raise ValidationError("The callback URL must not carry a user name or password: each body is signed instead.")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValidationError("The callback URL's port is not a port number (1-65535).")
    host = parts.hostname.lower()
    if (host, None) not in allowed and (host, port or DEFAULT_PORTS[parts.scheme]) not in allowed:
        named = {name for name, _ in allowed}
        where = f"{parts.hostname} on this port" if host in named else parts.hostname
        raise ValidationError(f"This server may not call {where}: it is not in CALLBACK_ALLOWED_HOSTS.")
    return url


def notify_finished_batches(*, analysis_ids: list[int]) -> None:
    """After a task: enqueue the callback of each batch among these analyses that is now finished."""
    batch_ids = set(
        Analysis.objects.filter(pk__in=analysis_ids, batch__callback_state=Batch.CallbackState.PENDING).values_list(
            "batch_id", flat=True
        )
    )
    for batch_id in sorted(_due().filter(pk__in=batch_ids).values_list("pk", flat=True)):
        _enqueue(batch_id)


def notify_deletion(*, batch_id: int) -> None:
    """Enqueue the callback of a batch whose delivered results a deletion changed (a cell of it,
    or the whole batch: then its event is ``batch.withdrawn``, with no cells)."""
    if _due().filter(pk=batch_id).exists():
        _enqueue(batch_id)


def requeue_due_callbacks() -> int:
    """The sweeper's part: callbacks whose enqueue was lost or whose pause after a failure is over."""
    due = list(_due().values_list("pk", flat=True))
    for batch_id in due:
        _enqueue(batch_id)
    return len(due)


def deliver(*, batch_id: int) -> bool:
    """One attempt, if this caller wins it. True once the receiver has answered 2xx."""
    claimed_at = timezone.now()
    lease = claimed_at + LEASE
    # Marked as sent with the claim itself: from here on the POST may go out whatever a deletion
    # meanwhile does to the count of attempts, so a deletion must withdraw it. An attempt called
    # off before its POST takes its mark back (_not_sent).
    claimed = (
        _due()
        .filter(pk=batch_id)
        .update(
            callback_due_at=lease,
            callback_attempts=F("callback_attempts") + 1,
            callback_first_sent_at=Coalesce(F("callback_first_sent_at"), Value(claimed_at)),
        )
    )
    batch = Batch.with_withdrawn.filter(pk=batch_id).first() if claimed else None
    if batch is None:  # not due, another attempt holds it, or deleted in between
        return False
    # The outcome is written only while this attempt's lease stands: a restart clears it.
    held = Batch.with_withdrawn.filter(
        pk=batch_id,
        callback_state=Batch.CallbackState.PENDING,
        callback_due_at=lease,
        callback_attempts=batch.callback_attempts,
    )
    try:
        check_callback_url(batch.callback_url)
    except ValidationError as refusal:  # the host was removed from the list since the batch came
        error = refusal.message[:300]  # the column's length: PostgreSQL refuses a longer one
        held.update(callback_state=Batch.CallbackState.FAILED, callback_due_at=None, callback_error=error)
        _not_sent(batch_id=batch_id, claimed_at=claimed_at)
        logger.warning("event=callback_refused batch_id=%s error=%r", batch_id, refusal.message)
        return False
    payload = _payload(batch)
    if any(cell["status"] in UNFINISHED for cell in payload["batch"]["analyses"]):
        # A cell was sent for analysis again after the claim: the batch goes out once it is done.
        held.update(callback_due_at=None, callback_attempts=F("callback_attempts") - 1)
        _not_sent(batch_id=batch_id, claimed_at=claimed_at)
        return False
    body = json.dumps(payload).encode()
    sent = True
    # Refused, unreachable, timed out, TLS, not HTTP, or the task's time limit: whatever stops an
    # attempt is a failed attempt, counted, paused and in the end given up, never one left hanging.
    try:
        status = _post(batch.callback_url, body, batch_id=batch.pk)
        error = "" if 200 <= status < 300 else f"the receiver answered HTTP {status}"
    except urllib.error.URLError as failure:  # urllib's wrapper of what stops the request going out
        sent = False
        error = f"{failure.reason.__class__.__name__}: {failure.reason}"
    except http.client.RemoteDisconnected:  # before its base class below: it answered nothing at all
        error = "the receiver closed the connection without answering"
    except http.client.HTTPException as failure:  # not a word of it shown: it is another service's banner
        error = f"the receiver did not answer in HTTP ({failure.__class__.__name__})"
    except Exception as failure:  # noqa: BLE001 - no answer, not HTTP, time up: it may have gone out
        error = f"{failure.__class__.__name__}: {failure}"
    if sent:  # recorded even if newer results will follow, or the receiver failed after taking them
        record_callback(batch=batch, error=error)
    else:  # still an attempt, counted towards giving up
        _not_sent(batch_id=batch_id, claimed_at=claimed_at)
    if not error:
        delivered_at = timezone.now()
        held.update(
            callback_state=Batch.CallbackState.DELIVERED,
            callback_delivered_at=delivered_at,
            callback_due_at=None,
            callback_error="",
        )
        logger.info("event=callback_delivered batch_id=%s attempts=%s", batch_id, batch.callback_attempts)
        if batch.withdrawn_at:  # the lab system knows: nothing of the batch is left to keep
            Batch.with_withdrawn.filter(pk=batch_id, callback_delivered_at=delivered_at).delete()
        return True
    given_up = batch.callback_attempts >= settings.CALLBACK_MAX_ATTEMPTS
    held.update(
        callback_state=Batch.CallbackState.FAILED if given_up else Batch.CallbackState.PENDING,
        callback_due_at=None if given_up else timezone.now() + retry_pause(batch.callback_attempts),
        callback_error=error[:300],
    )
    logger.warning("event=callback_failed batch_id=%s attempts=%s error=%r", batch_id, batch.callback_attempts, error)
    return False


def _not_sent(*, batch_id: int, claimed_at) -> None:
    """An attempt called off before its POST: the batch is not marked as sent by it (an earlier
    attempt's mark stays)."""
    Batch.with_withdrawn.filter(pk=batch_id, callback_first_sent_at=claimed_at).update(callback_first_sent_at=None)


def retry(*, batch: Batch) -> bool:
    """failed -> pending with a fresh count of attempts, e.g. once the lab system is back. Only a
    failed callback can be retried: a pending one is still being tried, a delivered one arrived."""
    restarted = _restart(Batch.with_withdrawn.filter(pk=batch.pk), from_states=[Batch.CallbackState.FAILED])
    if restarted:
        logger.info("event=callback_retry batch_id=%s", batch.pk)
        _enqueue(batch.pk)
    return bool(restarted)


def send_again(*, batch_ids: Iterable[int]) -> int:
    """Any state -> pending with no lease: these batches have new results (cells analysed again,
    reviewed), which go out once every cell is finished, as the first ones did. An attempt under
    way for a pending one loses its lease, so it cannot mark the batch delivered with the old
    results. A batch whose receiver is failing keeps its count of attempts and waits out the pause
    it is in: a review a minute called a lab system that was down at once, each time, and never gave
    up. A withdrawal is a message of its own, and starts afresh."""
    pending = Batch.CallbackState.PENDING
    with transaction.atomic():
        batches = Batch.with_withdrawn.filter(pk__in=batch_ids)
        # Locked (in id order, as every writer of several batches takes them): an attempt claimed
        # between the look and the update would leave its count to the restart below.
        failing = list(
            batches.select_for_update()
            .filter(callback_state=pending, withdrawn_at__isnull=True)
            .exclude(callback_error="")
            .order_by("pk")
            .values_list("pk", "callback_attempts", "callback_due_at")
        )
        now = timezone.now()
        for batch_id, attempts, due in failing:
            # Its pause kept, not begun anew (a review each hour put off a 60-minute one for ever),
            # but its value changed: an attempt under way holds its lease as its due time.
            resume = min(due, now + retry_pause(attempts)) + timedelta(microseconds=1) if due else now
            Batch.with_withdrawn.filter(pk=batch_id).update(callback_due_at=resume)
        states = [Batch.CallbackState.PENDING, Batch.CallbackState.DELIVERED, Batch.CallbackState.FAILED]
        return len(failing) + _restart(batches.exclude(pk__in=[pk for pk, _, _ in failing]), from_states=states)


def _restart(batches: QuerySet[Batch], *, from_states: list[str]) -> int:
    return batches.filter(callback_state__in=from_states).update(
        callback_state=Batch.CallbackState.PENDING, callback_attempts=0, callback_due_at=None, callback_error=""
    )


def retry_pause(attempts: int) -> timedelta:
    return timedelta(minutes=min(2 ** (attempts - 1), LONGEST_PAUSE_MINUTES))


def signature(body: bytes) -> str:
    # Never SECRET_KEY: the receiving system holds this key, and Django's key signs sessions.
    return "sha256=" + hmac.new(settings.CALLBACK_SECRET.encode(), body, hashlib.sha256).hexdigest()


def _due():
    """Batches with a pending callback, every cell finished, and no pause or lease running."""
    unfinished = Analysis.objects.filter(batch=OuterRef("pk"), status__in=UNFINISHED)
    return (
        Batch.with_withdrawn.filter(callback_state=Batch.CallbackState.PENDING)
        .filter(Q(callback_due_at__isnull=True) | Q(callback_due_at__lte=timezone.now()))
        .exclude(Exists(unfinished))
    )


def _enqueue(batch_id: int) -> None:
    from diagnosis.tasks import deliver_batch_callback  # here, not at the top: tasks imports this module

    try:
        deliver_batch_callback.apply_async(args=[batch_id], retry=True)
    except Exception:  # noqa: BLE001 - the sweeper enqueues it again
        logger.warning("event=callback_enqueue_failed batch_id=%s; the sweeper will retry", batch_id, exc_info=True)


def _payload(batch: Batch) -> dict:
    """The fields and formats GET /api/batches/{id}/ has for the same batch, so a lab system that
    both polls and takes callbacks reads one diagnosis under one name."""
    analyses = list(batch.analyses.order_by("pk"))
    return {
        "event": "batch.withdrawn" if batch.withdrawn_at else "batch.finished",
        # Any account may name any allowed URL, and one secret signs for every receiver: the lab
        # system takes only its own service account's results ("" once that account is removed).
        "account": batch.owner.get_username() if batch.owner else "",
        "batch": {
            "id": batch.pk,
            "sample_reference": batch.sample_reference,
            "created_at": _timestamp(batch.created_at),
            "results_as_of": results_timestamp(selectors.results_as_of(batch=batch, analyses=analyses)),
            "counts": selectors.batch_counts(batch=batch),
            "analyses": [
                {
                    "id": a.pk,
                    "original_filename": a.original_filename,
                    "status": a.status,
                    "final_label": a.final_label,  # the reviewer's, where one disagreed with the model
                    "label": a.label,
                    "review_verdict": a.review_verdict,
                    "review_note": a.review_note,
                    "probability_parasitized": a.probability_parasitized,
                    "decision_threshold": a.decision_threshold,
                    "borderline": a.is_borderline,
                    "model_version": a.model_version,
                    "error": a.error,
                }
                for a in analyses
            ],
        },
    }


def _timestamp(moment) -> str:
    return DateTimeField().to_representation(moment)  # as the API writes it, in TIME_ZONE


def results_timestamp(moment: datetime) -> str:
    """``results_as_of`` as the API and the callbacks write it: in UTC, so that the later of two
    sorts later as text too. In TIME_ZONE, the night its clocks go back wrote a review made 40
    minutes after a result as 02:10+01:00, before the result's 02:30+02:00."""
    return DateTimeField(default_timezone=UTC).to_representation(moment)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect could lead anywhere, past the allowed hosts: it counts as a failure


_opener = urllib.request.build_opener(_NoRedirects)


def _post(url: str, body: bytes, *, batch_id: int) -> int:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "malaria-screening-callback/1",
            "X-Malaria-Batch": str(batch_id),
            "X-Malaria-Signature": signature(body),
        },
    )
    try:
        with _opener.open(request, timeout=TIMEOUT_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as answer:
        return answer.code
