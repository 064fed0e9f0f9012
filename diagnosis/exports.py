"""CSV exports and the printable batch report."""

import csv
import unicodedata
from collections.abc import Iterator

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from diagnosis import selectors
from diagnosis.audit import record_access
from diagnosis.files import missing_pictures
from diagnosis.forms import FilterForm
from diagnosis.models import AccessEvent
from diagnosis.templatetags.scores import score

CSV_COLUMNS = [
    "analysis_id",
    "batch_id",
    "sample_reference",
    "original_filename",
    "status",
    "final_label",
    "label",
    "probability_parasitized",
    "decision_threshold",
    "model_version",
    "review_verdict",
    "corrected_label",
    "reviewed_by",
    "reviewed_at",
    "created_at",
    "finished_at",
    # Added at the end: a lab's import that reads the earlier columns by position reads them still.
    "borderline",
    "error",  # why a failed cell failed, as its page and the API say
    "review_note",
]


def csv_safe(value) -> str:
    """Stop spreadsheet formula injection from user-chosen text such as file names. Judged in
    compatibility form: Numbers reads a full-width "＝" (or a small "﹦") as "=" and runs the rest."""
    text = "" if value is None else str(value)
    return "'" + text if unicodedata.normalize("NFKC", text[:1])[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class _Line:
    """What csv.writer writes to: each row comes back as a string, to be streamed."""

    def write(self, line: str) -> str:
        return line


def csv_download(*, header: list[str], rows: Iterator[list], filename: str) -> StreamingHttpResponse:
    """Streamed as the rows come: a lab's whole history, or a year of the access trail, never sits
    in memory at once. ``rows`` should be a generator over a query's ``iterator()``: Django closes
    it, and so the database cursor, if the download is cut off."""
    # Every field quoted: where a spreadsheet splits on ";", an unquoted "x;=cmd" would start a formula.
    writer = csv.writer(_Line(), quoting=csv.QUOTE_ALL)

    def lines():
        # A byte-order mark first: Excel, which these files are opened in, reads a CSV without one in
        # the computer's legacy code page, and "Müller" became "MÃ¼ller". (Programs: read utf-8-sig.)
        yield "\ufeff" + writer.writerow(header)
        for row in rows:
            yield writer.writerow(row)

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _csv_response(analyses, filename: str) -> StreamingHttpResponse:
    rows = (_csv_row(a) for a in analyses.select_related("reviewed_by").iterator(chunk_size=500))
    return csv_download(header=CSV_COLUMNS, rows=rows, filename=filename)


def _csv_row(a) -> list:
    return [
        a.pk,
        a.batch_id or "",
        csv_safe(a.batch.sample_reference if a.batch else ""),
        csv_safe(a.original_filename),
        a.status,
        a.final_label,
        a.label,
        "" if a.probability_parasitized is None else score(a.probability_parasitized),
        "" if a.decision_threshold is None else a.decision_threshold,
        a.model_version,
        a.review_verdict,
        a.corrected_label,
        csv_safe(a.reviewer),
        _local(a.reviewed_at),
        _local(a.created_at),
        _local(a.finished_at),
        ("yes" if a.is_borderline else "no") if a.status == a.Status.DONE else "",
        csv_safe(a.error),
        csv_safe(a.review_note),
    ]


def _local(moment) -> str:
    """In the site's time zone, as the pages show it, with its UTC offset."""
    return timezone.localtime(moment).isoformat() if moment else ""


@login_required
@require_GET
def dashboard_csv(request):
    analyses = selectors.analyses_for(user=request.user, filters=FilterForm(request.GET).to_filters())
    if (rows := analyses.count()) > settings.EXPORT_MAX_ROWS:
        messages.error(
            request,
            f"That export would hold {rows:,} rows, more than one download carries ({settings.EXPORT_MAX_ROWS:,}). "
            "Narrow it with the filters, e.g. a date range, and export each part; a lab system can page "
            "through /api/analyses/ instead.",
        )
        return redirect(f"{reverse('diagnosis:dashboard')}?{request.GET.urlencode()}")
    record_access(
        request=request,
        action=AccessEvent.Action.EXPORTED,
        detail=f"dashboard CSV, {rows} rows",
        owner_id=request.user.pk,  # only the user's own analyses are listed
    )
    return _csv_response(analyses, "analyses.csv")


@login_required
@require_GET
def batch_csv(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    record_access(request=request, action=AccessEvent.Action.EXPORTED, batch=batch, detail="CSV")
    return _csv_response(batch.analyses.select_related("batch").order_by("id"), f"batch-{batch.pk}.csv")


@login_required
@require_GET
def batch_report(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    record_access(request=request, action=AccessEvent.Action.EXPORTED, batch=batch, detail="printable report")
    analyses = list(selectors.batch_analyses_by_suspicion(batch=batch).select_related("reviewed_by"))
    for analysis in analyses:  # said on paper, as on the cell's page: a result printed without its cell
        analysis.missing_pictures = missing_pictures(analysis)
    counts = selectors.batch_counts(batch=batch)
    context = {
        "batch": batch,
        "analyses": analyses,
        "counts": counts,
        "unfinished": counts["queued"] + counts["running"],
        "models": selectors.batch_models(batch=batch),
        # As the batch page says: the one deleted may have been the positive cell.
        "deleted_cells": selectors.cells_deleted_from(batch=batch),
    }
    return render(request, "diagnosis/report.html", context)
