import ipaddress
import time
from urllib.parse import unquote_plus

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.http import Http404, HttpResponseForbidden, JsonResponse
from django.shortcuts import render
from django.urls import is_valid_path
from django.utils.cache import patch_cache_control

from diagnosis.errors import api_not_found, not_found


class DebugServesThisMachineOnlyMiddleware:
    """With DJANGO_DEBUG=true an error page shows the request's local variables: a patient's file
    name or sample reference. ALLOWED_HOSTS keeps debug to this machine's names, but any client on
    the network can send ``Host: localhost`` (``HOST=0.0.0.0 scripts/start``), so requests from
    another machine are refused outright."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if settings.DEBUG and not _from_this_machine(request):
            return HttpResponseForbidden(
                "This server runs with DJANGO_DEBUG=true, which serves this machine only. "
                "For other machines, run the production setup (docs/deploy.md).",
                content_type="text/plain",
            )
        return self.get_response(request)


def _from_this_machine(request) -> bool:
    address = request.META.get("REMOTE_ADDR", "")
    if not address:  # no network peer at all: a caller in this process (a WSGI test client)
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack listener
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class RequestSizeLimitMiddleware:
    """Refuse bodies over REQUEST_MAX_BYTES from Content-Length, before anything reads them."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.REQUEST_MAX_BYTES
        if length <= limit:
            return self.get_response(request)
        if request.path.startswith("/api/") or request.headers.get("X-Requested-With") == "XMLHttpRequest":
            message = f"The request is too large ({length} bytes); the limit is {limit} bytes."
            return JsonResponse({"detail": message}, status=413)
        # The upload form sent without JavaScript: a page, not a line of JSON in bytes.
        return render(request, "413.html", {"length": length, "limit": limit}, status=413)


class ApiSlashMiddleware:
    """An API path sent without its trailing slash is served as the path with it. Django's
    APPEND_SLASH would answer with a redirect, which HTTP clients follow as a GET: a lab system
    POSTing a batch to ``/api/batches`` would be shown the list (200) and store nothing.
    An API path of no route at all is answered here, as JSON: with DEBUG on (scripts/start),
    Django's own answer is its HTML debug page, whatever handler404 says."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        path = request.path_info
        if path.startswith("/api/") and not is_valid_path(path):
            if path.endswith("/") or not is_valid_path(f"{path}/"):
                return api_not_found()
            request.path_info, request.path = f"{path}/", f"{request.path}/"
        return self.get_response(request)


class RefuseNulCharactersMiddleware:
    """Refuse a query string holding a NUL character (``?search=%00``): PostgreSQL cannot compare
    text with one, so every search, filter and admin lookup it reached would fail with a 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        # From the raw query string: parsing request.GET here would raise its own errors too early.
        if "\x00" in unquote_plus(request.META.get("QUERY_STRING", "")):
            return JsonResponse({"detail": "The query string must not contain NUL characters."}, status=400)
        return self.get_response(request)


class NoStoreWhenSignedInMiddleware:
    """Pages for a signed-in user hold patient data, and workstations are shared: after sign-out,
    the browser's Back button must not bring the last user's pages back from its cache."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and not response.has_header("Cache-Control"):
            patch_cache_control(response, private=True, no_store=True)
        return response


class SignOutMiddleware:
    """Ends a web sign-in SESSION_HOURS after it began, however busy, and after SESSION_IDLE_MINUTES
    without the user doing anything: a clinician called away leaves a shared workstation signed in.

    The pages' own polling (views marked ``polled``) is not the user doing anything, so a results
    page left open does not keep a sign-in alive. Activity is written to the session at most once
    a minute; that write also moves Django's own expiry of the session on, which is why the
    sign-in time is kept and checked here."""

    SIGNED_IN_AT = "signed_in_at"
    LAST_ACTIVITY = "last_activity"
    RECORD_EVERY = 60  # seconds: the session is not written on every request

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        # Signing in or out starts or ends the sign-in itself: no "you were signed out" on top. (The
        # sign-out page opened with GET is a page like another: past the limit it is not "signed in as".)
        signing = request.resolver_match.url_name == "login" or (
            request.resolver_match.url_name in ("logout", "admin-logout") and request.method == "POST"
        )
        if not request.user.is_authenticated or signing:
            return None
        session, now = request.session, int(time.time())
        signed_in_at = session.setdefault(self.SIGNED_IN_AT, now)  # a sign-in from before this check began
        last = session.setdefault(self.LAST_ACTIVITY, now)
        idle_seconds = settings.SESSION_IDLE_MINUTES * 60
        if now - signed_in_at > settings.SESSION_COOKIE_AGE:
            reason = f"Your sign-in ended after {settings.SESSION_COOKIE_AGE // 3600} hours."
        elif idle_seconds and now - last > idle_seconds + self.RECORD_EVERY:  # the last record may be a minute old
            reason = f"You were signed out after {settings.SESSION_IDLE_MINUTES} minutes without activity."
        else:
            if idle_seconds and not getattr(view_func, "polled", False) and now - last >= self.RECORD_EVERY:
                session[self.LAST_ACTIVITY] = now
            return None
        logout(request)  # the view then sees no one: the sign-in page, or a 401 for scripts and the API
        messages.info(request, f"{reason} Sign in again.")
        return None


class SameSignInMiddleware:
    """Refuses a form sent from a page that was opened under another sign-in.

    forms.js gives each form the latest sign-in's CSRF token, so that signing in again in another
    tab does not lose what was typed; but on a shared workstation the page may be clinician A's
    while B is signed in now, and A's patient's images would be stored in B's account. forms.js also
    sends the id of the user the page was rendered for (``signed_in_as``); a form without it (the
    admin's, a browser without JavaScript, whose token Django's rotation at sign-in has retired) is
    left to the CSRF check. The API is left alone: reading its body here would parse it with
    Django's parser, which DRF then reuses, and its own parser's refusals would never be made."""

    FIELD = "signed_in_as"
    MESSAGE = (
        "Someone else has signed in on this browser since this page was opened, so nothing was done. "
        "Open the page again to work as the person signed in now."
    )

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if request.method != "POST" or request.path.startswith("/api/") or not request.user.is_authenticated:
            return None
        opened_by = request.POST.get(self.FIELD)
        if opened_by is None or opened_by == str(request.user.pk):
            return None
        if request.headers.get("X-Requested-With") == "XMLHttpRequest":
            return JsonResponse({"detail": self.MESSAGE}, status=409)
        return render(request, "other_sign_in.html", {"message": self.MESSAGE}, status=409)


PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"  # deploy/nginx.conf's too


class ContentSecurityPolicyMiddleware:
    """Pages load scripts, styles and images from this site only, and cannot be framed: an injected
    tag could neither run nor send patient data elsewhere. (Styles may be inline: Django's admin and
    Redoc set some; Redoc runs its search in a worker it makes from a blob.) And no page, nor a frame
    in one, may ask the browser for a camera, microphone or location, none of which the site uses."""

    POLICY = (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        # Not in development: Django's debug error pages run inline scripts.
        if not settings.DEBUG and response.get("Content-Type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", self.POLICY)
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response


class SiteNotFoundPageMiddleware:
    """With DJANGO_DEBUG=true (scripts/start) a record that is gone, deleted or another user's, still
    gets the site's own 404 page, which says so: Back to a deleted cell showed Django's debug page,
    listing the URL patterns. A path of no route keeps the debug page, for the developer."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if settings.DEBUG and isinstance(exception, Http404) and not request.path.startswith(("/api/", "/admin/")):
            return not_found(request, exception)
        return None
