"""The access trail: every opening of a patient record, download, export, upload, review and deletion.

Views call ``record_access`` once a lookup has succeeded (a 404 for someone else's id opens
nothing, so records nothing). The site's lists and the live-status polls are not recorded: they
are the owner's own overview and would drown the trail; an owner's own thumbnails are not either,
for the same reason (anyone else's are: a reviewer's queue shows other users' patients). Each page
of an API list is (``record_list_read``): a key read in bulk, a leaked one too, leaves a trace.
A lab system polling a batch until it finishes would drown it too, as would the batch grid's
heatmap previews on hover, so a viewing or download that repeats one by the same user, of the
same record and file, through the same channel within REPEAT_WINDOW is not recorded again; every
other action always is.
"""

import ipaddress
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from diagnosis.login_throttle import client_address
from diagnosis.models import AccessEvent, Analysis, Batch

REPEAT_WINDOW = timedelta(minutes=10)
REPEATABLE = (AccessEvent.Action.VIEWED, AccessEvent.Action.DOWNLOADED)


def record_access(
    *,
    request,
    action: AccessEvent.Action,
    analysis: Analysis | None = None,
    batch: Batch | None = None,
    detail: str = "",
    owner_id: int | None = None,
    once_in_a_while: bool = True,
) -> AccessEvent | None:
    """``owner_id``: the owner of what was read, where no one record was (a list).
    ``once_in_a_while=False``: recorded each time, even where a repeat would not be."""
    event = access_event(request=request, action=action, analysis=analysis, batch=batch, detail=detail)
    event.owner_id = event.owner_id or owner_id
    if once_in_a_while and action in REPEATABLE and _seen_recently(event):
        return None
    event.save()
    return event


def access_event(
    *, request, action: AccessEvent.Action, analysis: Analysis | None = None, batch: Batch | None = None, detail: str
) -> AccessEvent:
    """The entry, not yet saved: many of them are saved at once (an account's records removed with it)."""
    subject = analysis or batch
    return AccessEvent(
        user=request.user,
        username=request.user.get_username(),
        action=action,
        channel=_channel(request.path),
        analysis_id=analysis.pk if analysis else None,
        batch_id=batch.pk if batch else (analysis.batch_id if analysis else None),
        owner_id=subject.owner_id if subject else None,
        detail=detail[:200],
        client_ip=_client_ip(request),
    )


def deletion_recorder(*, request) -> Callable[..., None]:
    """The ``record`` of services.delete_analysis and services.delete_batch: one entry for the cell,
    or for the batch with the number of cells that went with it."""

    def record(deleted: Analysis | Batch, cells: int = 1) -> None:
        subject = {"batch": deleted} if isinstance(deleted, Batch) else {"analysis": deleted}
        record_access(request=request, action=AccessEvent.Action.DELETED, detail=counted(cells, "cell"), **subject)

    return record


def record_list_read(
    *, request, records: list[Analysis] | list[Batch], noun: str, page: int, own: bool = True
) -> AccessEvent | None:
    """One page of a list, with the span of ids it held (the query's values are left out: a sample
    reference may name a patient): of the user's own records in the API, of anyone's (``own=False``)
    in the admin. The same page of one's own read again within REPEAT_WINDOW, a lab system polling,
    is recorded once; of anyone's (a reviewer's searches of every user's records), each time: the span
    of ids would tell two searches for different patients apart only by chance."""
    ids = sorted(record.pk for record in records)
    held = f", ids {ids[0]}–{ids[-1]}" if ids else ""
    detail = f"list of {counted(len(ids), noun)}, page {page}{held}"
    owner_id = request.user.pk if own else None
    return record_access(
        request=request, action=AccessEvent.Action.VIEWED, detail=detail, owner_id=owner_id, once_in_a_while=own
    )


def record_dataset_export(*, analyses: list[Analysis], out: str) -> None:
    """Cells copied into a reviewed-cells data set (``manage.py export_reviewed_cells``), which is
    made to leave the clinical system: one entry per cell, as for any other export."""
    events = (
        AccessEvent(
            username="(export_reviewed_cells)",
            action=AccessEvent.Action.EXPORTED,
            channel=AccessEvent.Channel.COMMAND,
            analysis_id=a.pk,
            batch_id=a.batch_id,
            owner_id=a.owner_id,
            detail=f"reviewed-cells data set in {out}"[:200],
        )
        for a in analyses
    )
    AccessEvent.objects.bulk_create(events, batch_size=1000)


def record_retention_deletion(*, cells: list[tuple[int, int | None, int]], older_than_days: int) -> None:
    """Cells (id, batch id, owner id) that the retention period removed: deletions nobody asked for
    on the day, so the trail says why each record ends there."""
    # `delete_expired_analyses --days N` may run where the setting is another period, or none.
    by_setting = older_than_days == settings.ANALYSIS_RETENTION_DAYS
    why = "ANALYSIS_RETENTION_DAYS" if by_setting else f"delete_expired_analyses --days {older_than_days}"
    AccessEvent.objects.bulk_create(
        (
            AccessEvent(
                username="(retention)",
                action=AccessEvent.Action.DELETED,
                channel=AccessEvent.Channel.COMMAND,
                analysis_id=pk,
                batch_id=batch_id,
                owner_id=owner_id,
                detail=f"uploaded over {older_than_days} days ago ({why})",
            )
            for pk, batch_id, owner_id in cells
        ),
        batch_size=1000,
    )


def record_account_deletion(*, request, user) -> None:
    """A user's batches and cells go with the account (and their files with them): each one leaves
    an entry in the access trail, as if deleted one by one. Written at once: one query per record
    (a count and an insert for each batch) made a lab system's 20,000 batches outlast the request."""
    deleted = AccessEvent.Action.DELETED
    events = [
        access_event(request=request, action=deleted, batch=batch, detail=counted(batch.cells, "cell"))
        for batch in user.batches.annotate(cells=Count("analyses")).order_by("pk")
    ]
    events += [
        access_event(request=request, action=deleted, analysis=analysis, detail="1 cell")
        for analysis in user.analyses.filter(batch__isnull=True).only("pk", "owner_id", "batch_id").order_by("pk")
    ]
    AccessEvent.objects.bulk_create(events, batch_size=1000)


def record_callback(*, batch: Batch, error: str = "") -> AccessEvent:
    """A batch's results sent to its lab system's callback URL: a disclosure with no user behind it.
    ``error``: why the attempt still failed (the receiver took the body, then answered no 2xx)."""
    return AccessEvent.objects.create(
        username="(callback)",
        action=AccessEvent.Action.EXPORTED,
        channel=AccessEvent.Channel.API,
        batch_id=batch.pk,
        owner_id=batch.owner_id,
        detail="; ".join(filter(None, [f"results POSTed to {batch.callback_host}", error]))[:200],
    )


def _seen_recently(event: AccessEvent) -> bool:
    # The same address too: a leaked key or session used elsewhere while its owner polls must show.
    return AccessEvent.objects.filter(
        user=event.user,
        client_ip=event.client_ip,
        action=event.action,
        channel=event.channel,
        analysis_id=event.analysis_id,
        batch_id=event.batch_id,
        detail=event.detail,
        at__gte=timezone.now() - REPEAT_WINDOW,
    ).exists()


def counted(number: int, noun: str) -> str:
    if number == 1:
        return f"{number} {noun}"
    return f"{number} {noun}es" if noun.endswith(("ch", "s", "x")) else f"{number} {noun}s"  # batches


def _channel(path: str) -> AccessEvent.Channel:
    if path.startswith("/api/"):
        return AccessEvent.Channel.API
    if path.startswith("/admin/"):
        return AccessEvent.Channel.ADMIN
    return AccessEvent.Channel.WEB


def _client_ip(request) -> str | None:
    """The address the login throttle uses too (CLIENT_IP_HEADER behind a proxy); None if not an IP."""
    try:
        return str(ipaddress.ip_address(client_address(request)))
    except ValueError:
        return None
