"""A limit on failed sign-ins per client address and username (brute-force guard).

The web sign-in, the admin's sign-in, the password change, the API token page and the API's token
endpoint all check passwords, so all count failures here: a locked-out username stays locked out
on each (a workstation left signed in must not become a place to guess its user's password).

A hospital's staff often share one address (its NAT or proxy), so the limit per address would let
anyone there lock everyone out. A browser that has signed in as a user is remembered by a signed
cookie (a "device cookie", as OWASP calls it) holding a random id for the browser and keyed digests
of its users' names: for that user, on that browser, failures count per browser instead of per
address, so guesses from elsewhere at the same address lock neither the user out there nor the
address, and its own typos count against nothing else.
"""

import contextlib
import hashlib
import ipaddress
import math
import secrets
import time
import unicodedata

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm, AdminPasswordChangeForm
from django.contrib.auth.views import LoginView, PasswordChangeView
from django.core.cache import cache
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.http import HttpResponse
from django.urls import reverse
from django.utils.crypto import salted_hmac

DEVICE_COOKIE = "known_device"
DEVICE_COOKIE_SALT = "diagnosis.login_throttle.device"
DEVICE_COOKIE_MAX_AGE = 180 * 24 * 3600
DEVICE_COOKIE_USERS = 5  # a shared workstation remembers its last few users


def client_address(request) -> str:
    """The client's address as every limit and the access trail take it: CLIENT_IP_HEADER behind a
    proxy, else the peer; never a header a client could make up itself. Of a list (X-Forwarded-For)
    the last entry, which the proxy appended: the first is whatever the client sent."""
    value = request.META.get(settings.CLIENT_IP_HEADER) or request.META.get("REMOTE_ADDR") or ""
    return value.split(",")[-1].strip()


def counted_source(address: str) -> str:
    """Where an address's attempts count: an IPv6 client's whole /64 network, which one machine is
    routinely given (2**64 addresses, each a fresh set of guesses otherwise); an IPv4 one as is."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 4:
        return str(parsed)
    if parsed.ipv4_mapped:  # an IPv4 client reaching a dual-stack socket
        return str(parsed.ipv4_mapped)
    return str(ipaddress.ip_network(f"{parsed}/64", strict=False))


def _digest(text: str) -> str:
    # A username or a client header may hold spaces, control characters or any length, which
    # memcached refuses as a key; a digest is always a valid key. Keyed, because Redis keeps its
    # keys on disk: an address or a name could be found again from a plain digest by trying them.
    return salted_hmac("diagnosis.login_throttle.key", text).hexdigest()


def _name(username: str) -> str:
    # NFKC as Django's username field: "ａlice" and "alice" sign in as one user, so count as one.
    # Case is kept, as the sign-in keeps it: "Alice" is another account, or none.
    return unicodedata.normalize("NFKC", username).strip()[:150]


def _key(request, username: str) -> str:
    """Where failures at this username count: per known browser, else per address, in the
    username's current round (see forgive)."""
    device = _known_device(request, username)
    source = f"device:{device}" if device else counted_source(client_address(request))
    name = _digest(_name(username))
    return f"login-failures:{_digest(source)}:{name}:{_round(name)}"


def _round_key(name_digest: str) -> str:
    return f"login-round:{name_digest}"


def _round(name_digest: str) -> str:
    """The username's current round ("" until it is first forgiven). Each attempt keeps it one
    lockout period longer, so it outlives every count made in it (gone early, it would forgive them
    too) and then expires: kept for ever, a key would be left behind for every user once forgiven."""
    key = _round_key(name_digest)
    current = cache.get(key, "")
    if current:
        cache.touch(key, timeout=settings.LOGIN_LOCKOUT_SECONDS)
    return current


def forgive(username: str) -> None:
    """Clear the username's lockout on every browser and address at once (an administrator's
    unlock, or a new password set for it): its counts are keyed by where they were made, so
    they are not found and deleted but left behind, to expire, by starting a new round. The
    counts from before it expire within a lockout period, the soonest this round can lapse back
    to "", so its lapsing revives none of them."""
    cache.set(_round_key(_digest(_name(username))), secrets.token_hex(8), timeout=settings.LOGIN_LOCKOUT_SECONDS)


def _address_key(request) -> str:
    return _address_count_key(counted_source(client_address(request)))


def _address_count_key(address: str) -> str:
    return f"login-failures-address:{_digest(address)}"


def forgive_address(address: str) -> bool:
    """Clear the count of failures at every name from ``address`` (a hospital's NAT locked out by
    guesses from one machine behind it); True if it was counting any. An IPv6 address clears its
    /64 network, where it was counted."""
    key = _address_count_key(counted_source(address.strip()))
    counting = bool(cache.get(key))
    cache.delete_many([key, f"{key}:since"])
    return counting


def _user_digest(username: str) -> str:
    # Keyed: the cookie is signed, not encrypted, and must not tell a shared workstation's next
    # user who used it before (an unkeyed digest of a staff name is found by trying the list).
    return salted_hmac(DEVICE_COOKIE_SALT, _name(username)).hexdigest()[:32]


def _cookie_value(request) -> str:
    """The device cookie's value ("" if it is forged, expired or missing)."""
    return request.get_signed_cookie(DEVICE_COOKIE, default="", salt=DEVICE_COOKIE_SALT, max_age=DEVICE_COOKIE_MAX_AGE)


def _device_cookie(value: str) -> tuple[str, list[str]]:
    """This browser's id and its users' digests, from the cookie's value."""
    device, separator, users = value.partition("|")
    if not separator:  # written before browsers had ids: its own digest stands in for one
        return (_digest(f"legacy:{value}")[:22], value.split(",")) if value else ("", [])
    return (device, users.split(",")) if device and users else ("", [])


def _legacy_user_digest(username: str) -> str:
    """How cookies written before 2026-12-02 named their users, lower-cased; they stay valid for their
    lifetime, or every ward browser would be a stranger at once after an upgrade. A case variant
    this matches gains nothing: failures count per browser and exact name, as for any other."""
    return hashlib.sha256(_name(username).lower().encode()).hexdigest()


def _known_device(request, username: str) -> str:
    """This browser's id if it has signed in as this user, else ""."""
    device, users = _device_cookie(_cookie_value(request))
    return device if {_user_digest(username), _legacy_user_digest(username)} & set(users) else ""


def remember_device(request, response: HttpResponse, username: str) -> None:
    """After a sign-in: this browser is known for this user from now on. A cookie of the earlier
    form is replaced whole: a random id of its own (browsers whose old cookies listed the same
    users would share the derived one) and keyed digests only."""
    value = _cookie_value(request)
    device, known = _device_cookie(value) if "|" in value else ("", [])
    digest = _user_digest(username)
    users = [digest] + [user for user in known if user != digest]
    response.set_signed_cookie(
        DEVICE_COOKIE,
        f"{device or secrets.token_urlsafe(16)}|{','.join(users[:DEVICE_COOKIE_USERS])}",
        salt=DEVICE_COOKIE_SALT,
        max_age=DEVICE_COOKIE_MAX_AGE,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Lax",
    )


def admit(request, username: str) -> bool:
    """Count this sign-in attempt before its password is checked; False (counting nothing) while
    locked out. Counted first, not once a password proves wrong: guesses sent all at once would
    each find the count still under the limit, and all have their passwords checked. A wrong
    password leaves the count as it is; see not_a_guess and signed_in for the others."""
    keys = _attempt_keys(request, username)
    counts = [_count(key) for key, _ in keys]
    if any(count > limit for count, (_, limit) in zip(counts, keys, strict=True)):
        for key, _ in keys:
            _uncount(key)
        return False
    return True


def not_a_guess(request, username: str) -> None:
    """An admitted attempt that checked no password (an empty field, a weak new password): uncounted."""
    for key, _ in _attempt_keys(request, username):
        _uncount(key)


def signed_in(request, username: str) -> None:
    """An admitted attempt whose password was right: the username's failures are forgiven, and the
    attempt is taken off the address's count (it was no failure)."""
    (user_key, _), *address = _attempt_keys(request, username)
    cache.delete(user_key)
    for key, _ in address:
        _uncount(key)


def _attempt_keys(request, username: str) -> list[tuple[str, int]]:
    """The counts an attempt at ``username`` goes to, each with its limit: the username's, and the
    address's unless this browser is known for this user."""
    keys = [(_key(request, username), settings.LOGIN_MAX_FAILURES)]
    if not _known_device(request, username):
        keys.append((_address_key(request), settings.LOGIN_MAX_FAILURES_PER_ADDRESS))
    return keys


def seconds_locked(request, username: str) -> int:
    """How long until a refused attempt at ``username`` would be admitted: a count lasts
    LOGIN_LOCKOUT_SECONDS from its first attempt (its start is kept beside it)."""
    now, waits = time.time(), [1]
    for key, limit in _attempt_keys(request, username):
        if cache.get(key, 0) >= limit:
            started = cache.get(f"{key}:since", now)
            waits.append(math.ceil(started + settings.LOGIN_LOCKOUT_SECONDS - now))
    return max(waits)


def _count(key: str) -> int:
    if not cache.add(key, 1, timeout=settings.LOGIN_LOCKOUT_SECONDS):
        try:
            count = cache.incr(key)
        except ValueError:  # expired between the two calls: this attempt starts a new count
            cache.add(key, 1, timeout=settings.LOGIN_LOCKOUT_SECONDS)
        else:
            if count > 1:
                return count
            # 1: a key Redis made anew, without an expiry (Django's incr asks whether the key exists,
            # then adds to it: one that expired in between is made at 0), or one left at 0.
            pass
    cache.set(f"{key}:since", time.time(), timeout=settings.LOGIN_LOCKOUT_SECONDS)
    return 1


def _uncount(key: str) -> None:
    with contextlib.suppress(ValueError):  # expired meanwhile: nothing left to take back
        if cache.decr(key) <= 0:  # a key expired mid-decr is made at -1, for ever: none is kept at 0 or below
            cache.delete(key)


def lockout_message(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return (
        f"Too many failed sign-in attempts. Try again in {minutes} minute{'s' if minutes != 1 else ''}, "
        "or ask an administrator to set a new password if it is forgotten."
    )


class LockoutMixin:
    """For a password form view: refused while locked out; a wrong password counts, a right one clears."""

    def checked_username(self) -> str:
        return self.request.POST.get("username", "")

    def is_guess(self, form) -> bool:
        # A wrong password is a guess; an empty field (Enter pressed too early, a password manager
        # not done filling) checks no password and must not lock anyone out.
        return form.has_error(NON_FIELD_ERRORS, "invalid_login")

    def post(self, request, *args, **kwargs):
        if not admit(request, self.checked_username()):
            # The form is not bound, so no password is checked: cleaning the posted one would show
            # "wrong password" beside the lockout for every guess but the right one.
            kwargs = self.get_form_kwargs()
            del kwargs["data"], kwargs["files"]
            kwargs["initial"] = {**kwargs["initial"], "username": self.checked_username()}
            seconds = seconds_locked(request, self.checked_username())
            context = self.get_context_data(form=self.get_form_class()(**kwargs), lockout=lockout_message(seconds))
            response = self.render_to_response(context, status=429)
            response["Retry-After"] = str(seconds)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        if not self.is_guess(form):  # a wrong password stays counted
            not_a_guess(self.request, self.checked_username())
        return super().form_invalid(form)

    def form_valid(self, form):
        signed_in(self.request, self.checked_username())
        return super().form_valid(form)


class ThrottledLoginView(LockoutMixin, LoginView):
    def form_valid(self, form):
        response = super().form_valid(form)
        remember_device(self.request, response, form.get_user().get_username())
        return response


class ThrottledPasswordChangeView(LockoutMixin, PasswordChangeView):
    def checked_username(self) -> str:
        return self.request.user.get_username()

    def is_guess(self, form) -> bool:
        # A wrong current password is a guess; an empty one or a weak new one is not.
        return form.has_error("old_password", "password_incorrect")


class LockoutAdminAuthenticationForm(AdminAuthenticationForm):
    """The admin's sign-in form under the same lockout: staff accounts can see every user's data."""

    def clean(self):
        username = self.data.get("username", "")
        if not admit(self.request, username):
            raise ValidationError(lockout_message(seconds_locked(self.request, username)), code="locked_out")
        try:
            cleaned = super().clean()
        except ValidationError:
            if self.user_cache is not None:  # the right password of a non-staff account is no guess
                not_a_guess(self.request, username)
            raise  # a wrong password stays counted
        if self.user_cache is None:  # an empty field: no password was checked
            not_a_guess(self.request, username)
        else:
            signed_in(self.request, username)
        return cleaned


def admin_login(request):
    """The admin's sign-in page (with LockoutAdminAuthenticationForm), remembering the browser as
    the web sign-in does."""
    response = admin.site.login(request)
    if request.method == "POST" and request.user.is_authenticated:
        remember_device(request, response, request.user.get_username())
    return response


def admin_password_change(request):
    """The admin's own password-change page (Django's checks the current password without limit),
    as AdminSite.password_change builds it, under the same lockout."""
    request.current_app = admin.site.name
    view = ThrottledPasswordChangeView.as_view(
        form_class=AdminPasswordChangeForm,
        success_url=reverse("admin:password_change_done", current_app=admin.site.name),
        extra_context=admin.site.each_context(request),
    )
    return view(request)
