import secrets
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import update_session_auth_hash
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import LogoutView, redirect_to_login
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import connection
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods

from diagnosis import login_throttle, selectors, services, tokens
from diagnosis.audit import counted, deletion_recorder, record_access
from diagnosis.files import browser_picture, missing_pictures, protected_file_response
from diagnosis.forms import FilterForm, UploadForm
from diagnosis.models import AccessEvent, Analysis, Batch
from malaria_site.celery import app as celery_app

PAGE_SIZE = 25


@login_required
@require_GET
def dashboard(request):
    form = FilterForm(request.GET)
    filters = form.to_filters()
    analyses = selectors.analyses_for(user=request.user, filters=filters)
    page = Paginator(analyses, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    # "Apply" with every filter empty filters nothing: a new account still sees how to start.
    filtered = any(value for name, values in query.lists() if name != "sort" for value in values)
    context = {
        "form": form,
        "page": page,
        "query": query.urlencode(),
        "filtered": filtered,
        # Sorted by score, the page's rows move into place as results arrive (live.js).
        "score_order": {"-probability_parasitized": "desc", "probability_parasitized": "asc"}.get(filters.sort, ""),
    }
    return render(request, "diagnosis/dashboard.html", context)


@login_required
@require_GET
def batch_list(request):
    search = request.GET.get("search", "").strip()
    batches = selectors.batches_matching(user=request.user, search=search)
    page = Paginator(batches, PAGE_SIZE).get_page(request.GET.get("page"))
    page.object_list = selectors.with_counts(batches=page.object_list)
    query = urlencode({"search": search}) if search else ""
    # Unlike the dashboard and a batch's page, this list does not poll: it says so while a sample is unfinished.
    in_progress = any(batch.finished < batch.total for batch in page.object_list)
    context = {"page": page, "search": search, "query": query, "in_progress": in_progress}
    return render(request, "diagnosis/batches.html", context)


@require_http_methods(["GET", "POST"])
def upload(request):
    if not request.user.is_authenticated:
        if request.method == "POST":  # no page after the sign-in could say so, nor keep the files
            messages.info(
                request, "Your session had ended, so nothing was stored: sign in, then choose the images again."
            )
        return redirect_to_login(request.get_full_path())
    form = UploadForm(request.POST or None, request.FILES or None)
    digest = _images_digest(request) if request.FILES.getlist("images") else ""  # before they are stored
    if digest and (sent := _batch_sent_as(request, digest=digest)) is not None:
        return _sent_before(request, sent)
    if request.method == "POST" and form.is_valid():
        try:
            detail = counted(len(form.cleaned_data["images"]), "image")
            batch, made = _store_upload(request, form.cleaned_data, detail=detail)
        except services.KeyReused:
            form.add_error(
                "images",
                "This page has uploaded its images already (look under Samples): open the upload page again "
                "to upload other images.",
            )
        except services.StorageFailed as failure:
            if _from_upload_script(request):
                return JsonResponse({"detail": str(failure)}, status=507)
            form.add_error("images", str(failure))
        except services.FilesRefused as refusal:
            if _from_upload_script(request):  # it keeps the other files for the next attempt
                refused = [{"position": position, "message": message} for position, message in refusal.refused]
                return JsonResponse({"detail": " ".join(refusal.messages), "refused": refused}, status=400)
            for message in refusal.messages:
                form.add_error("images", message)
        except ValidationError as error:
            for message in error.messages:
                form.add_error("images", message)
        else:
            if not made:
                return _sent_before(request, batch.pk)
            _remember_sent(request, batch.pk, digest=digest)
            messages.success(request, f"{detail} queued for analysis.")
            return _to_batch(request, batch.pk)
    status = 400 if request.method == "POST" else 200
    context = {
        "form": form,
        "max_files": settings.BATCH_MAX_FILES,
        "max_bytes": settings.UPLOAD_MAX_BYTES,
        "max_request_bytes": settings.REQUEST_MAX_BYTES,
    }
    return render(request, "diagnosis/upload.html", context, status=status)


def _store_upload(request, data: dict, *, detail: str) -> tuple[Batch, bool]:
    """The batch the form makes, and whether this request made it: one sent again while the first
    was still being checked (the session does not know of the first yet) gets the first's batch."""
    fields = {
        "owner": request.user,
        "uploads": data["images"],
        "sample_reference": data["sample_reference"],
        "note": data["note"],
        "record": lambda batch: record_access(
            request=request, action=AccessEvent.Action.UPLOADED, batch=batch, detail=detail
        ),
    }
    if not data["upload_id"]:  # a page drawn before forms carried one
        return services.create_batch(**fields), True
    return services.create_batch_once(idempotency_key=f"upload-page:{data['upload_id']}", **fields)


def _sent_before(request, batch_id: int):
    messages.info(
        request,
        f"These images were already uploaded as batch #{batch_id} (the form was sent again, after Back "
        "perhaps): nothing was stored twice. To store them again, delete that batch first.",
    )
    return _to_batch(request, batch_id)


# The images this session has uploaded (a digest of their names and bytes, in order), each with
# the batch they made. After Back a browser may fetch the form afresh and put the chosen files back
# in it, but not the reference it had: the same images sent again must not store the same
# patient's cells twice, with or without the reference. Other images are a new upload.
SENT_UPLOADS = "sent_uploads"


def _batch_sent_as(request, *, digest: str) -> int | None:
    batch_id = request.session.get(SENT_UPLOADS, {}).get(digest)
    return batch_id if batch_id and selectors.batches_for(user=request.user).filter(pk=batch_id).exists() else None


def _remember_sent(request, batch_id: int, *, digest: str) -> None:
    sent = [item for item in request.session.get(SENT_UPLOADS, {}).items() if item[0] != digest][-19:]
    request.session[SENT_UPLOADS] = dict([*sent, (digest, batch_id)])


def _images_digest(request) -> str:
    return services.request_digest(
        uploads=request.FILES.getlist("images"), sample_reference="", note="", callback_url=""
    )


def _from_upload_script(request) -> bool:
    return request.headers.get("X-Requested-With") == "XMLHttpRequest"


def _to_batch(request, batch_id: int):
    url = reverse("diagnosis:batch", args=[batch_id])
    if _from_upload_script(request):
        # The upload script navigates itself; an XHR following a redirect would eat the message.
        return JsonResponse({"redirect": url})
    return redirect(url)


@login_required
@require_GET
def batch_detail(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    record_access(request=request, action=AccessEvent.Action.VIEWED, batch=batch)
    # Read before the counts (see batch_status), so the page never shows every cell finished under
    # counts from an earlier moment, which it would then never update.
    analyses = list(selectors.batch_analyses_by_suspicion(batch=batch))
    came_from = _came_from(request)
    context = {
        "batch": batch,
        "came_from": came_from,
        "back_url": came_from or reverse("diagnosis:batch-list"),
        "analyses": analyses,
        "counts": selectors.batch_counts(batch=batch),
        "history": selectors.access_history(batch=batch),
        "deleted_cells": selectors.cells_deleted_from(batch=batch),
        # More than one after a new model is installed and some cells are analysed again.
        "models": selectors.batch_models(batch=batch),
    }
    return render(request, "diagnosis/batch.html", context)


def _came_from(request) -> str:
    """The list page (with its filters and page number) the user opened this analysis from, if any:
    only a path on this site, never another host."""
    target = request.POST.get("from") or request.GET.get("from") or ""
    on_this_site = url_has_allowed_host_and_scheme(target, allowed_hosts=None) and target.startswith("/")
    return target if on_this_site else ""


def _keeping_from(url: str, came_from: str) -> str:
    return f"{url}?{urlencode({'from': came_from})}" if came_from else url


def _analysis_context(request, analysis: Analysis) -> dict:
    came_from = _came_from(request)
    if analysis.batch_id:
        default = reverse("diagnosis:batch", args=[analysis.batch_id])
    else:
        default = reverse("diagnosis:dashboard")
    return {"back_url": came_from or default, "came_from": came_from}


@login_required
@require_GET
def analysis_detail(request, pk: int):
    analysis = selectors.get_analysis(user=request.user, pk=pk)
    record_access(request=request, action=AccessEvent.Action.VIEWED, analysis=analysis)
    context = {
        "analysis": analysis,
        "history": selectors.access_history(analysis=analysis),
        "missing_pictures": missing_pictures(analysis),
        **_analysis_context(request, analysis),
    }
    return render(request, "diagnosis/analysis.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def analysis_delete(request, pk: int):
    analysis = selectors.get_analysis(user=request.user, pk=pk)
    navigation = _analysis_context(request, analysis)
    if request.method == "POST":
        services.delete_analysis(analysis=analysis, record=deletion_recorder(request=request))
        messages.success(request, f"Deleted {analysis.original_filename}: its image, heatmap and result are gone.")
        return redirect(navigation["back_url"])
    context = {
        "subject": analysis.original_filename,
        "analysis": analysis,  # its thumbnail and sample, to check it is the right cell
        "record": f"cell {pk}",  # the title, which browser history keeps: no name a patient's may be in
        "cells": 1,
        "cancel_url": _keeping_from(reverse("diagnosis:analysis", args=[pk]), navigation["came_from"]),
        "came_from": navigation["came_from"],
    }
    return render(request, "diagnosis/confirm_delete.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def batch_delete(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    if request.method == "POST":
        services.delete_batch(batch=batch, record=deletion_recorder(request=request))
        messages.success(request, f"Deleted batch #{pk} with its images, heatmaps and results.")
        return redirect(_came_from(request) or "diagnosis:batch-list")  # the list of samples it was one of
    came_from = _came_from(request)
    context = {
        "subject": f"batch #{pk}" + (f" ({batch.sample_reference})" if batch.sample_reference else ""),
        "record": f"batch #{pk}",
        "cells": batch.analyses.count(),
        "cancel_url": _keeping_from(reverse("diagnosis:batch", args=[pk]), came_from),
        "came_from": came_from,
        # Withdrawn there once an attempt may have posted them, confirmed or not (services.delete_batch).
        "lab_system": batch.callback_host if batch.results_may_have_reached else "",
        "lab_system_confirmed": batch.callback_delivered_at is not None,
    }
    return render(request, "diagnosis/confirm_delete.html", context)


def _not_done_on_a_get(request, to: str):
    """A POST-only action's URL opened with a GET: where the sign-in page sends the user back once
    their session had ended as they pressed its button. A GET changes nothing; the page says so."""
    messages.info(request, "Nothing was done yet: your session had ended. Press the button again to do it.")
    return redirect(to)


@login_required
@require_http_methods(["GET", "POST"])
def analysis_retry(request, pk: int):
    analysis = selectors.get_analysis(user=request.user, pk=pk)
    if request.method == "GET":
        return _not_done_on_a_get(request, reverse("diagnosis:analysis", args=[pk]))
    if services.retry_failed_analyses(analyses=Analysis.objects.filter(pk=analysis.pk)):
        messages.success(request, f"{analysis.original_filename} is queued for analysis again.")
    else:
        messages.info(request, f"{analysis.original_filename} has not failed: nothing to try again.")
    # Still on the way back to the list it was opened from, filters and page kept.
    return redirect(_keeping_from(reverse("diagnosis:analysis", args=[pk]), _came_from(request)))


@login_required
@require_http_methods(["GET", "POST"])
def batch_retry(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    if request.method == "GET":
        return _not_done_on_a_get(request, reverse("diagnosis:batch", args=[pk]))
    retried = services.retry_failed_analyses(analyses=batch.analyses.all())
    if retried:
        messages.success(request, f"{counted(len(retried), 'failed cell')} queued for analysis again.")
    else:  # a double submit, or a page older than the last retry
        messages.info(request, "No failed cells to analyse again.")
    return redirect(_keeping_from(reverse("diagnosis:batch", args=[pk]), _came_from(request)))


@login_required
@require_GET
def analysis_file(request, pk: int, kind: str):
    analysis = selectors.get_viewable_analysis(user=request.user, pk=pk)
    if kind == "picture":  # the original, drawn for a page
        response = browser_picture(analysis.image, download_stem=f"image-{analysis.pk}")
    else:
        response = protected_file_response(getattr(analysis, kind), download_stem=f"{kind}-{analysis.pk}")
    # Recorded once there is a file to send (a 404 disclosed nothing). An owner's thumbnails come in
    # bulk with their own lists, which are not recorded either; anyone else's (a reviewer's queue)
    # are someone else's patient data, and are.
    if kind != "thumbnail" or analysis.owner_id != request.user.pk:
        record_access(request=request, action=AccessEvent.Action.DOWNLOADED, analysis=analysis, detail=kind)
    return response


@never_cache  # the page can hold a new key: no copy of it may stay in a shared workstation's cache
@login_required
@require_http_methods(["GET", "POST"])
def api_token(request):
    """The user's API token for a lab system: when it expires; issue a new one (shown once) or revoke it.

    Issuing asks for the password again: a key outlives the session, so someone at a workstation
    left signed in must not be able to walk away with one. Each rendering of the form carries a
    one-time id, so reloading the page that shows a new key (the browser sends the form again)
    cannot issue another and stop the one just copied into the lab system."""
    password_error, issued_key = "", None
    if request.method == "POST":
        if request.POST.get("action") == "revoke":
            token = tokens.current_token(user=request.user)
            if token and request.POST.get("confirmed") != "yes":  # one slip must not cut a lab system off
                return render(request, "diagnosis/api_token_revoke.html", {"token": token})
            tokens.revoke_token(user=request.user)
            messages.success(request, "API token revoked: the key no longer works.")
            return redirect("diagnosis:api-token")
        open_forms = request.session.get(TOKEN_FORM_IDS, [])
        if request.POST.get("form_id") not in open_forms:
            messages.info(request, "That form had been used already, so no key was issued: use the one below.")
            return redirect("diagnosis:api-token")
        password_error = _password_refusal(request)
        if not password_error:
            _, issued_key = tokens.new_token(user=request.user)
            request.session[TOKEN_FORM_IDS] = [i for i in open_forms if i != request.POST["form_id"]]
    form_id = secrets.token_urlsafe(16)
    # A few pages at once (two tabs) each keep a working form.
    request.session[TOKEN_FORM_IDS] = [*request.session.get(TOKEN_FORM_IDS, [])[-4:], form_id]
    token = tokens.current_token(user=request.user)
    context = {
        "token": token,
        "issued_key": issued_key,
        "form_id": form_id,
        "password_error": password_error,
        "expires_at": tokens.expires_at(token) if token else None,
        "expired": bool(token) and tokens.token_expired(token),
    }
    return render(request, "diagnosis/api_token.html", context, status=400 if password_error else 200)


TOKEN_FORM_IDS = "api_token_form_ids"


def _password_refusal(request) -> str:
    """Why the password given to issue a key is refused ("" if it is the user's), counting failures."""
    username = request.user.get_username()
    if not login_throttle.admit(request, username):
        return login_throttle.lockout_message(login_throttle.seconds_locked(request, username))
    password = request.POST.get("password", "")
    if not password:  # checks nothing, so counts for nothing
        login_throttle.not_a_guess(request, username)
        return "Enter your current password: a new key needs it."
    hashed = request.user.password
    if not request.user.check_password(password):  # stays counted
        return "That is not your password. A new key needs your current password."
    login_throttle.signed_in(request, username)
    if request.user.password != hashed:  # Django re-hashed it on checking: stay signed in
        update_session_auth_hash(request, request.user)
    return ""


class SignOutView(LogoutView):
    """Django's sign-out, then the sign-in page says it happened: otherwise identical to the one before
    signing in, it left a shared workstation's next user unsure that the session had ended. Nothing of
    the account is said, and the message is in the new, empty session.

    Its address opened in the browser (a bookmark, typed, an old link) asks to confirm, where Django
    answers an empty 405 and leaves the user signed in; someone signed out already is sent to sign in."""

    http_method_names = ["get", "post", "options"]
    template_name = "registration/sign_out.html"

    def get(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect("login")
        return super().get(request, *args, **kwargs)

    def post(self, request, *args, **kwargs):
        response = super().post(request, *args, **kwargs)
        messages.info(request, "You are signed out.")
        return response


@require_GET
def favicon(request):
    """Pages without a <link rel="icon"> (Django's admin) make browsers ask for /favicon.ico: a 404
    in the log for every admin page opened. Not permanent: the icon's name changes with its content."""
    return redirect(static("img/favicon.svg"))


@require_GET
def healthz(request):
    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as error:  # noqa: BLE001 - any failure is a failed check
        checks["database"] = f"error: {error.__class__.__name__}"
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:  # noqa: BLE001
        checks["broker"] = f"error: {error.__class__.__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if healthy else "degraded", **checks}, status=200 if healthy else 503)


def _status_payload(analysis: Analysis) -> dict:
    return {
        "id": analysis.pk,
        "status": analysis.status,
        "status_display": analysis.get_status_display(),
        "label": analysis.final_label,
        "probability_parasitized": analysis.probability_parasitized,
        "decision_threshold": analysis.decision_threshold,
        "borderline": analysis.is_borderline and not analysis.review_verdict,  # to confirm first, as the badge
        "finished": analysis.is_finished,
        "overlay_url": reverse("diagnosis:analysis-file", args=[analysis.pk, "overlay"]) if analysis.overlay else None,
        "model_version": analysis.model_version,
    }


def signed_in_json(view):
    """For the endpoints pages poll: a 401 the script can act on, not a redirect to the sign-in page."""

    @wraps(view)
    def checked(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"detail": "Your session has ended; sign in again."}, status=401)
        return view(request, *args, **kwargs)

    checked.polled = True  # not the user's activity: see SignOutMiddleware
    return checked


@signed_in_json
@require_GET
def analyses_status(request):
    """Current state of the user's analyses named in ``?ids=1,2,3`` (the pages poll this)."""
    parts = request.GET.get("ids", "").split(",")
    # Longer than 18 digits cannot be a row id, and SQLite overflows on it.
    ids = [int(part) for part in parts if part.isascii() and part.isdigit() and len(part) <= 18][:200]
    analyses = selectors.analyses_for(user=request.user).filter(pk__in=ids)
    return JsonResponse({"analyses": [_status_payload(a) for a in analyses]})


@signed_in_json
@require_GET
def batch_status(request, pk: int):
    batch = selectors.get_batch(user=request.user, pk=pk)
    # Items before counts: an analysis finishing in between then shows in the counts first, and the
    # page keeps polling for it. The other order could mark every item finished with stale counts.
    analyses = [_status_payload(a) for a in batch.analyses.all()]
    counts = selectors.batch_counts(batch=batch)
    return JsonResponse({"id": batch.pk, "counts": counts, "analyses": analyses})
