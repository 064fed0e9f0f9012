"""Every read of analyses and batches, always scoped to the requesting user; only the staff's
operations summary at the end counts across users, and it holds no patient data."""

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import reduce

from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Permission
from django.db.models import Avg, Case, Count, Exists, F, Min, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.utils import timezone

from diagnosis.models import REVIEW_CONFIDENCE, SUSPICION, AccessEvent, Analysis, Batch, is_borderline
from diagnosis.text import composed, plain_line

ACCESS_HISTORY_SHOWN = 20


@dataclass(frozen=True)
class AnalysisFilters:
    status: str = ""
    label: str = ""
    search: str = ""
    reviewed: str = ""  # "yes", "no" or ""
    borderline: bool | None = None  # True: only borderline calls; False: every other cell; None: both
    date_from: str = ""
    date_to: str = ""
    batch: int | None = None
    sort: str = "-created_at"

    # Each order the list takes, with the name the dashboard's menu gives it.
    SORTS = {
        "-created_at": "Newest first",
        "created_at": "Oldest first",
        "-probability_parasitized": "Most suspicious first",
        "probability_parasitized": "Least suspicious first",
    }


def analyses_for(*, user: AbstractBaseUser, filters: AnalysisFilters | None = None) -> QuerySet[Analysis]:
    filters = filters or AnalysisFilters()
    queryset = Analysis.objects.filter(owner=user).select_related("batch")
    if filters.status in Analysis.Status.values:
        queryset = queryset.filter(status=filters.status)
    if filters.label in Analysis.Label.values:
        queryset = queryset.filter(final_label_is(filters.label))
    if filters.batch is not None:
        queryset = queryset.filter(batch_id=filters.batch)
    if search := plain_line(filters.search):
        queryset = queryset.filter(
            Q(original_filename__icontains=search) | Q(batch__sample_reference__icontains=search)
        )
    if filters.reviewed == "yes":
        queryset = queryset.exclude(review_verdict="")
    elif filters.reviewed == "no":
        queryset = queryset.filter(review_verdict="")
    if filters.borderline is not None:
        queryset = queryset.filter(is_borderline()) if filters.borderline else queryset.exclude(is_borderline())
    # As ranges of created_at, not created_at__date: the (owner, created_at) index serves a range.
    if filters.date_from:
        queryset = queryset.filter(created_at__gte=_start_of(_within_calendar(date.fromisoformat(filters.date_from))))
    if filters.date_to:
        day_after = _within_calendar(date.fromisoformat(filters.date_to)) + timedelta(days=1)
        queryset = queryset.filter(created_at__lt=_start_of(day_after))
    sort = filters.sort if filters.sort in AnalysisFilters.SORTS else "-created_at"
    if "probability" not in sort:  # the index's own order; NULLS LAST would make PostgreSQL sort every row
        return queryset.order_by(sort, "-id" if sort.startswith("-") else "id")
    # Unfinished cells have no probability yet: last in either direction, on PostgreSQL as on SQLite.
    # By suspicion, as the batch page: a reviewer's correction decides the side a cell is on, and
    # each score is weighed against its own model's threshold.
    if sort.startswith("-"):
        return queryset.order_by(_by_label(first=Analysis.Label.PARASITIZED), SUSPICION.desc(nulls_last=True), "-id")
    return queryset.order_by(_by_label(first=Analysis.Label.UNINFECTED), SUSPICION.asc(nulls_last=True), "-id")


def _by_label(*, first: str) -> Case:
    """The cells with the final label ``first``, then those with the other, then unlabelled ones."""
    other = Analysis.Label.UNINFECTED if first == Analysis.Label.PARASITIZED else Analysis.Label.PARASITIZED
    return Case(
        When(final_label_is(first), then=Value(0)), When(final_label_is(other), then=Value(1)), default=Value(2)
    )


def _within_calendar(day: date) -> date:
    """A date form accepts 0001-01-01 and 9999-12-31, whose day after, or whose start in a time zone
    ahead of UTC, is outside what datetime holds: such far dates filter as these, which hold."""
    return min(max(day, date(1900, 1, 1)), date(9999, 12, 30))


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def get_analysis(*, user: AbstractBaseUser, pk: int) -> Analysis:
    """The user's analysis, or 404 (never 403, so other users' ids are not revealed)."""
    return get_object_or_404(Analysis, pk=pk, owner=user)


REVIEW_PERMISSION = "diagnosis.review_analysis"


def can_review(*, user: AbstractBaseUser) -> bool:
    return user.is_authenticated and user.has_perm(REVIEW_PERMISSION)


def holds_review_permission(*, user: AbstractBaseUser) -> bool:
    """Whether the account would review once active: has_perm answers False for any inactive one."""
    return user.is_superuser or _review_permission_granted(to=user).exists()


def _review_permission_granted(*, to: AbstractBaseUser | OuterRef) -> QuerySet[Permission]:
    """The review permission, if given to the account (``to``) directly or through a group."""
    app_label, codename = REVIEW_PERMISSION.split(".")
    granted = Permission.objects.filter(content_type__app_label=app_label, codename=codename)
    return granted.filter(Q(user=to) | Q(group__user=to))


def accounts_with_their_records(*, users: Iterable[AbstractBaseUser]) -> list[AbstractBaseUser]:
    """The accounts, in the order given, each with what deleting it takes along, in one query:
    ``batch_count`` (withdrawn batches left out, as everywhere but the admin's own list),
    ``cell_count``, ``admin_changes`` (its entries in Django's admin history) and
    ``holds_review`` (as holds_review_permission, superusers aside)."""
    ids = [user.pk for user in users]

    def count_of(records: QuerySet, owner: str) -> Coalesce:
        per_owner = records.filter(**{owner: OuterRef("pk")}).order_by().values(owner)
        return Coalesce(Subquery(per_owner.annotate(count=Count("pk")).values("count")), 0)

    accounts = (
        get_user_model()
        .objects.filter(pk__in=ids)
        .annotate(
            batch_count=count_of(Batch.objects.all(), "owner"),
            cell_count=count_of(Analysis.objects.all(), "owner"),
            admin_changes=count_of(LogEntry.objects.all(), "user"),
            holds_review=Exists(_review_permission_granted(to=OuterRef("pk"))),
        )
        .in_bulk()
    )
    return [accounts[pk] for pk in ids if pk in accounts]


def get_viewable_analysis(*, user: AbstractBaseUser, pk: int) -> Analysis:
    """Owners see their own analyses; reviewers (and admins) may see any."""
    if can_review(user=user):
        return get_object_or_404(Analysis, pk=pk)
    return get_analysis(user=user, pk=pk)


def analysis_exists(*, analysis: Analysis) -> bool:
    """Whether the cell is still stored: its owner may delete it while a reviewer has it open."""
    return Analysis.objects.filter(pk=analysis.pk).exists()


def review_queue(*, user: AbstractBaseUser) -> tuple[QuerySet[Analysis], QuerySet[Analysis]]:
    """(cases awaiting review, least confident first; cases a reviewer disagreed with)."""
    if not can_review(user=user):
        raise Http404
    done = Analysis.objects.filter(status=Analysis.Status.DONE).select_related("owner", "batch")
    pending = (
        done.filter(review_verdict="")
        # Confidence is the distance from the model's own decision threshold, not from 0.5.
        .annotate(confidence=REVIEW_CONFIDENCE)  # as the review_queue index has it, so it is read in order
        .order_by("confidence", "created_at")
    )
    disagreements = (
        done.filter(review_verdict=Analysis.Verdict.DISAGREE).select_related("reviewed_by").order_by("-reviewed_at")
    )
    return pending, disagreements


def reviews_by(*, user: AbstractBaseUser) -> QuerySet[Analysis]:
    """The cases this reviewer last reviewed, newest first."""
    if not can_review(user=user):
        raise Http404
    return Analysis.objects.filter(reviewed_by=user).select_related("batch").order_by("-reviewed_at")


# How long a case opened for review (diagnosis.review records each opening in the trail) is left
# to the reviewer who opened it when the next case is picked for someone else.
REVIEW_HOLD = timedelta(minutes=10)


def replaced_verdicts(*, analysis: Analysis, limit: int = 10) -> list[AccessEvent]:
    """The verdicts saved on the cell before the one it carries, newest first, from the access trail:
    a colleague's agreement that a disagreement replaced is the case to talk over, and the cell
    itself keeps only the last verdict."""
    saved = AccessEvent.objects.filter(analysis_id=analysis.pk, action=AccessEvent.Action.REVIEWED)
    saved = saved.order_by("-at", "-id")
    return list(saved[1 : limit + 1] if analysis.review_verdict else saved[:limit])


def next_case(*, user: AbstractBaseUser, pending: QuerySet[Analysis]) -> Analysis | None:
    """The first of ``pending`` that no other reviewer has opened for review lately, so that two
    reviewers saving in turn are not both sent to the same case; if all are open elsewhere, the first."""
    lately = timezone.now() - REVIEW_HOLD
    opened_elsewhere = AccessEvent.objects.filter(
        action=AccessEvent.Action.VIEWED, detail="review", at__gte=lately
    ).exclude(user=user)
    return pending.exclude(pk__in=opened_elsewhere.values("analysis_id")).first() or pending.first()


def reviewed_analyses() -> QuerySet[Analysis]:
    """Every user's finished analyses that a reviewer has confirmed or corrected (for operators only)."""
    done = Analysis.objects.filter(status=Analysis.Status.DONE).exclude(review_verdict="")
    return done.select_related("batch").order_by("pk")


def batches_for(*, user: AbstractBaseUser) -> QuerySet[Batch]:
    return Batch.objects.filter(owner=user)


def get_batch(*, user: AbstractBaseUser, pk: int) -> Batch:
    return get_object_or_404(Batch, pk=pk, owner=user)


def batch_analyses_by_suspicion(*, batch: Batch) -> QuerySet[Analysis]:
    """Cells labelled Parasitized first, a reviewer's correction included (a positive a microscopist
    found in a low score must not sit among the negatives), each part most likely parasitized
    first; unfinished cells last on every database."""
    by_suspicion = _by_label(first=Analysis.Label.PARASITIZED)
    return batch.analyses.order_by(by_suspicion, SUSPICION.desc(nulls_last=True), "id")


def batch_models(*, batch: Batch) -> list[tuple[str, float | None]]:
    """(model version, decision threshold) of every model that classified a cell of the batch."""
    finished = batch.analyses.filter(status=Analysis.Status.DONE)  # a failed cell may name a model but no threshold
    return list(finished.values_list("model_version", "decision_threshold").distinct().order_by("model_version"))


def final_label_is(label: str, *, path: str = "") -> Q:
    """The label a cell shows (Analysis.final_label): a reviewer's correction, else the model's."""
    return Q(**{f"{path}corrected_label": label}) | Q(**{f"{path}corrected_label": "", f"{path}label": label})


def _analysis_counts(path: str = "") -> dict[str, Count]:
    """Analyses counted by status and by final label (a reviewer's correction overrides the model),
    reached through ``path`` ("" from a batch's analyses, "analyses__" from batches)."""

    def count(*alternatives: dict) -> Count:
        conditions = [Q(**{path + key: value for key, value in alternative.items()}) for alternative in alternatives]
        return Count(f"{path}id", filter=reduce(operator.or_, conditions) if conditions else None)

    def final_label(label: str) -> Count:
        return Count(f"{path}id", filter=final_label_is(label, path=path))

    return {
        "total": count(),
        "queued": count({"status": Analysis.Status.QUEUED}),
        "running": count({"status": Analysis.Status.RUNNING}),
        "done": count({"status": Analysis.Status.DONE}),
        "failed": count({"status": Analysis.Status.FAILED}),
        "finished": count({"status__in": [Analysis.Status.DONE, Analysis.Status.FAILED]}),
        "parasitized": final_label(Analysis.Label.PARASITIZED),
        "uninfected": final_label(Analysis.Label.UNINFECTED),
        "borderline": Count(f"{path}id", filter=is_borderline(path)),
    }


def batch_counts(*, batch: Batch) -> dict[str, int | None]:
    return with_percent(counts=batch.analyses.aggregate(**_analysis_counts()))


def with_percent(*, counts: dict[str, int]) -> dict[str, int | None]:
    # As the templates' {% widthratio %} computes it, so the live page and a reload agree.
    percent = round(counts["parasitized"] / counts["done"] * 100) if counts["done"] else None
    return {**counts, "parasitized_percent": percent}


def results_as_of(*, batch: Batch, analyses: Iterable[Analysis]) -> datetime:
    """When the batch's results last changed: a cell finished, reviewed, deleted or sent for analysis
    again, or the batch deleted. Results can change after they were sent, so a lab system keeps the
    latest."""
    changes = [moment for a in analyses for moment in (a.finished_at, a.reviewed_at) if moment]
    changes += [moment for moment in (batch.results_changed_at, batch.withdrawn_at) if moment]
    return max(changes, default=batch.created_at)


BATCH_COUNT_NAMES = tuple(_analysis_counts())


def batches_matching(*, user: AbstractBaseUser, search: str = "", sample_reference: str = "") -> QuerySet[Batch]:
    """The user's batches, newest first, without their counts: page them, then ``with_counts``."""
    batches = batches_for(user=user)
    if reference := plain_line(search):
        # A note keeps its invisible characters (Persian and Hindi words hold a zero-width non-joiner):
        # found by the text as typed, or without them as pasted along with it.
        batches = batches.filter(
            Q(sample_reference__icontains=reference)
            | Q(note__icontains=composed(search).strip())
            | Q(note__icontains=reference)
        )
    if sample_reference := plain_line(sample_reference):
        batches = batches.filter(sample_reference__iexact=sample_reference)
    return batches.order_by("-created_at", "-id")


def batches_with_counts(*, user: AbstractBaseUser) -> QuerySet[Batch]:
    """The user's batches, each with the counts of ``batch_counts`` as attributes: to fetch one."""
    return batches_for(user=user).annotate(**_counts_of_each_batch())


def with_counts(*, batches: Iterable[Batch]) -> list[Batch]:
    """A page of batches, in its order, with the counts of ``batch_counts`` as attributes. Counted
    for these rows only: on the annotated query, PostgreSQL counted every row an OFFSET skipped
    (page 800 of 20,000 batches: 1.25 s)."""
    ids = [batch.pk for batch in batches]
    counted = Batch.objects.filter(pk__in=ids).annotate(**_counts_of_each_batch()).in_bulk()
    return [counted[pk] for pk in ids if pk in counted]  # one deleted in between is left out


def _counts_of_each_batch() -> dict[str, Coalesce]:
    """The counts of batch_counts, each as a subquery of the batch's row: worked out for the rows
    asked for, where a join grouped by batch would count every batch of the account first (1.3 s
    for a lab system's 20,000)."""
    cells = Analysis.objects.filter(batch=OuterRef("pk")).order_by().values("batch")
    return {
        name: Coalesce(Subquery(cells.annotate(count=count).values("count")), 0)
        for name, count in _analysis_counts().items()
    }


def access_history(*, analysis: Analysis | None = None, batch: Batch | None = None) -> tuple[list[AccessEvent], int]:
    """The latest trail entries about a record its owner has opened, and how many there are in all.

    A cell's history includes its batch's batch-wide entries (opening the batch page, CSV exports,
    printed reports, callbacks), since each of those disclosed the cell too; a batch's history is
    those batch-wide entries alone. Callers pass a record already fetched for its owner.
    """
    if analysis is not None:
        about = Q(analysis_id=analysis.pk)
        if analysis.batch_id:
            about |= Q(batch_id=analysis.batch_id, analysis_id__isnull=True)
    else:
        about = Q(batch_id=batch.pk, analysis_id__isnull=True)
    events = AccessEvent.objects.filter(about)
    return list(events[:ACCESS_HISTORY_SHOWN]), events.count()


def cells_deleted_from(*, batch: Batch) -> int:
    """How many of a batch's cells were deleted, one by one or by retention (as the trail records it)."""
    return (
        AccessEvent.objects.filter(batch_id=batch.pk, action=AccessEvent.Action.DELETED, analysis_id__isnull=False)
        .values("analysis_id")
        .distinct()
        .count()
    )


def operations_status() -> dict:
    """Queue, throughput, failures and callbacks across all users, for monitoring: counts only."""
    now = timezone.now()
    last_day = Q(finished_at__gte=now - timedelta(hours=24))
    done, failed = Q(status=Analysis.Status.DONE), Q(status=Analysis.Status.FAILED)
    # Two aggregates, each over the rows its index finds, not one over every analysis ever made.
    unfinished = Analysis.objects.filter(status__in=[Analysis.Status.QUEUED, Analysis.Status.RUNNING])
    analyses = unfinished.aggregate(
        queued=Count("pk", filter=Q(status=Analysis.Status.QUEUED)),
        running=Count("pk", filter=Q(status=Analysis.Status.RUNNING)),
        # Since it was last sent to the broker (a cell analysed again was uploaded long before).
        oldest_queued_at=Min(Coalesce("enqueued_at", "created_at"), filter=Q(status=Analysis.Status.QUEUED)),
        oldest_running_since=Min("started_at", filter=Q(status=Analysis.Status.RUNNING)),
    ) | Analysis.objects.filter(last_day).aggregate(
        done_last_24h=Count("pk", filter=done & last_day),
        failed_last_24h=Count("pk", filter=failed & last_day),
        mean_inference_ms_last_24h=Avg("inference_ms", filter=done & last_day),
        mean_turnaround_last_24h=Avg(F("finished_at") - F("created_at"), filter=done & last_day),
    )
    oldest, turnaround = analyses.pop("oldest_queued_at"), analyses.pop("mean_turnaround_last_24h")
    running_since = analyses.pop("oldest_running_since")
    callbacks = Batch.with_withdrawn.aggregate(
        callbacks_pending=Count("pk", filter=Q(callback_state=Batch.CallbackState.PENDING)),
        callbacks_failed=Count("pk", filter=Q(callback_state=Batch.CallbackState.FAILED)),
    )
    versions = Analysis.objects.filter(done & last_day).values_list("model_version", flat=True).order_by().distinct()
    return {
        **analyses,
        "oldest_queued_seconds": (now - oldest).total_seconds() if oldest else None,
        # A worker killed outright leaves its cells running until the sweeper (ANALYSIS_STALE_SECONDS).
        "oldest_running_seconds": (now - running_since).total_seconds() if running_since else None,
        "mean_turnaround_seconds_last_24h": turnaround.total_seconds() if turnaround else None,
        "model_versions_last_24h": sorted(versions),
        **callbacks,
    }
