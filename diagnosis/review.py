"""The reviewer queue: members of the `reviewers` group confirm or correct the model's calls."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.html import format_html
from django.views.decorators.http import require_GET, require_http_methods

from diagnosis import selectors, services
from diagnosis.audit import record_access, record_list_read
from diagnosis.files import missing_pictures
from diagnosis.forms import ReviewForm, show_review_time
from diagnosis.models import AccessEvent, Analysis


@login_required
@require_GET
def queue(request):
    pending, disagreements = selectors.review_queue(user=request.user)
    page = Paginator(pending, 50).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "disagreements": list(disagreements[:20]),
        # Agreed cases leave the queue: without this list a verdict given by mistake is not found again.
        "mine": list(selectors.reviews_by(user=request.user)[:20]),
    }
    # Other users' file names, samples and labels, some with no thumbnail whose download is recorded.
    shown = {cell.pk: cell for cell in [*page.object_list, *context["disagreements"], *context["mine"]]}
    record_list_read(request=request, records=list(shown.values()), noun="cell", page=page.number, own=False)
    return render(request, "diagnosis/review_queue.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def review(request, pk: int):
    saving = request.method == "POST"
    if saving and not selectors.can_review(user=request.user):
        # Taken out of the reviewers while the case was open: "not found" would blame the case.
        return render(request, "403.html", status=403)
    if not selectors.can_review(user=request.user):  # as the queue answers them: not even that the page is there
        raise Http404
    try:
        analysis = selectors.get_viewable_analysis(user=request.user, pk=pk)
    except Http404:
        if not saving:
            raise
        # Every cell is a reviewer's to see: one missing now was deleted since the page was opened.
        messages.warning(request, f"Cell {pk} was deleted while you had it open: there is nothing to review.")
        return redirect("diagnosis:review-queue")
    if analysis.status != Analysis.Status.DONE:  # nothing to judge yet, or ever: its own page says why
        # By number: its name, another user's, would go unrecorded (only a finished cell's opening is).
        messages.info(request, f"Cell {pk} has no result to review ({analysis.get_status_display()}).")
        return redirect("diagnosis:review-queue")
    if request.method == "GET":
        record_access(request=request, action=AccessEvent.Action.VIEWED, analysis=analysis, detail="review")
    form = ReviewForm(request.POST or None, initial=_initial_review(analysis=analysis, user=request.user))
    if saving and form.is_valid():
        verdict = form.cleaned_data["verdict"]
        try:
            with transaction.atomic():  # a review is saved with its entry in the access trail, or not at all
                services.review_analysis(
                    analysis=analysis,
                    reviewer=request.user,
                    verdict=verdict,
                    corrected_label=form.cleaned_data["corrected_label"],
                    note=form.cleaned_data["note"],
                    replacing=form.cleaned_data["replacing"],
                )
                record_access(request=request, action=AccessEvent.Action.REVIEWED, analysis=analysis, detail=verdict)
        except ValidationError as error:
            if not selectors.analysis_exists(analysis=analysis):  # its owner deleted it meanwhile
                messages.warning(request, f"{analysis.original_filename} was deleted while you had it open.")
                return redirect("diagnosis:review-queue")
            form.add_error(None, error)
            analysis.refresh_from_db()  # show the case's review as it is now
            # Told of a colleague's review now: saving again replaces it (a field's error has no code).
            if getattr(error, "code", None) == services.REVIEW_CONFLICT:
                show_review_time(form, analysis.reviewed_at)
        else:
            messages.success(
                request,
                format_html(
                    'Review of {} saved ({}d). <a href="{}">Change it</a>',
                    analysis.original_filename,
                    verdict,
                    reverse("diagnosis:review", args=[analysis.pk]),
                ),
            )
            following, _ = selectors.review_queue(user=request.user)
            next_case = selectors.next_case(user=request.user, pending=following)
            return redirect("diagnosis:review", pk=next_case.pk) if next_case else redirect("diagnosis:review-queue")
    status = 400 if saving else 200
    context = {
        "analysis": analysis,
        "form": form,
        "replaced": selectors.replaced_verdicts(analysis=analysis),
        "missing_pictures": missing_pictures(analysis),  # the pictures the verdict is given on
    }
    return render(request, "diagnosis/review.html", context, status=status)


def _initial_review(*, analysis: Analysis, user) -> dict:
    """What the form opens with: the reviewer's own earlier verdict when they come back to change it
    (another reviewer's is shown beside the form, not put in it: saving would sign their note)."""
    initial = {"replacing": analysis.reviewed_at}
    if analysis.review_verdict and analysis.reviewed_by_id == user.pk:
        initial |= {
            "verdict": analysis.review_verdict,
            "corrected_label": analysis.corrected_label,
            "note": analysis.review_note,
        }
    return initial
