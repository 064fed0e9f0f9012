import hashlib
import io
import logging
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.sessions.models import Session
from django.core.cache.backends.base import CacheKeyWarning
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis.models import Batch
from tests.factories import PASSWORD, UserFactory, api_key, upload
from tests.test_api_requests import BOUNDARY, UNREADABLE_PARTS, _image, _multipart


def test_web_login_is_throttled_after_repeated_failures(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    for _ in range(3):
        assert client.post("/accounts/login/", {"username": user.username, "password": "wrong"}).status_code == 200
    blocked = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert blocked.status_code == 429 and "Too many failed sign-in attempts" in blocked.content.decode()
    assert "_auth_user_id" not in client.session


def _page_errors(response) -> list[str]:
    return re.findall(r'<div class="errors" role="alert">(.*?)</div>', response.content.decode(), re.S)


def test_a_locked_out_sign_in_does_not_tell_a_right_password_from_a_wrong_one(client, user, settings):
    """A guesser kept guessing past the lockout would learn the password from a "wrong password"
    shown beside the lockout for every guess but the right one."""
    settings.LOGIN_MAX_FAILURES = 2
    for _ in range(2):
        client.post("/accounts/login/", {"username": user.username, "password": "wrong"})
    wrong = client.post("/accounts/login/", {"username": user.username, "password": "still wrong"})
    right = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert wrong.status_code == right.status_code == 429
    assert _page_errors(wrong) == _page_errors(right)
    assert "correct username and password" not in wrong.content.decode()
    assert f'value="{user.username}"' in right.content.decode()  # the name stays typed


def test_a_locked_out_password_change_does_not_tell_a_right_password_from_a_wrong_one(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 2
    client.force_login(user)
    new = {"new_password1": "a-Fresh-passphrase-42", "new_password2": "a-Fresh-passphrase-42"}
    for _ in range(2):
        client.post("/accounts/password_change/", {"old_password": "guess", **new})
    wrong = client.post("/accounts/password_change/", {"old_password": "another guess", **new})
    right = client.post("/accounts/password_change/", {"old_password": PASSWORD, **new})
    assert wrong.status_code == right.status_code == 429
    assert "old password was entered incorrectly" not in wrong.content.decode()
    assert "Too many failed sign-in attempts" in right.content.decode()


def test_guesses_sent_all_at_once_get_no_more_password_checks_than_the_limit(transactional_db, settings):
    """Each guess used to be counted once its password proved wrong: a burst sent together all found
    the count under the limit, and all had their passwords checked."""
    settings.LOGIN_MAX_FAILURES = 3
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]  # a check takes time
    target = UserFactory()
    guesses = 12
    start = threading.Barrier(guesses)

    def guess(number: int) -> str:
        try:
            start.wait()
            page = Client().post("/accounts/login/", {"username": target.username, "password": f"guess {number}"})
            return "refused" if page.status_code == 429 else "checked"
        finally:
            connection.close()

    with ThreadPoolExecutor(guesses) as pool:
        answers = Counter(pool.map(guess, range(guesses)))
    assert answers == {"checked": 3, "refused": guesses - 3}


def test_a_lockout_says_how_long_it_has_left(client, user, settings, monkeypatch):
    """It said "15 minutes" and Retry-After: 900 however much of the lockout had passed."""
    from diagnosis import login_throttle

    settings.LOGIN_MAX_FAILURES, settings.LOGIN_LOCKOUT_SECONDS = 1, 900
    clock = SimpleNamespace(time=lambda: 1_000_000.0)
    monkeypatch.setattr(login_throttle, "time", clock)
    client.post("/accounts/login/", {"username": user.username, "password": "wrong"})
    clock.time = lambda: 1_000_000.0 + 630  # 270 s left
    page = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert page.status_code == 429 and "Try again in 5 minutes, or ask an administrator" in page.content.decode()
    assert page["Retry-After"] == "270"
    api = APIClient(REMOTE_ADDR="127.0.0.1").post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert api.status_code == 429 and api["Retry-After"] == "270" and "5 minutes" in api.json()["detail"]


def test_a_token_request_that_is_no_form_checks_no_password_and_counts_for_nothing(db, settings):
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 2
    api = APIClient()
    for _ in range(3):
        assert api.post("/api/auth/token/", [1, 2], format="json").status_code == 400
    assert api.post("/api/auth/token/", {"username": "nobody", "password": "x"}).status_code == 400, "not locked out"


def test_a_count_taken_back_below_one_is_removed_not_kept_for_ever():
    """Redis makes a key that expired between Django's exists-check and its DECRBY at -1, with no
    expiry: kept, the address's count would stay one short of its failures for good."""
    from django.core.cache import cache

    from diagnosis import login_throttle

    cache.set("login-failures-address:test", 0, timeout=None)  # as Redis leaves such a key
    login_throttle._uncount("login-failures-address:test")
    assert cache.get("login-failures-address:test") is None


def test_a_forgiven_users_round_outlives_its_counts_and_then_expires(user, settings, monkeypatch):
    """An unlock started a new round for the username and kept it for ever: a key per user once
    forgiven, left behind even after the user was removed. It lapses now, but not while a lockout
    counted in it is still running."""
    from django.core.cache import cache
    from django.core.cache.backends import base, locmem

    from diagnosis import login_throttle

    settings.LOGIN_MAX_FAILURES, settings.LOGIN_LOCKOUT_SECONDS = 2, 900
    clock = SimpleNamespace(time=lambda: 1_000_000.0)
    for module in (login_throttle, base, locmem):  # the counts' clock and the cache's expiries
        monkeypatch.setattr(module, "time", clock)
    round_key = login_throttle._round_key(login_throttle._digest(user.username))

    def sign_in(password: str) -> int:
        return Client().post("/accounts/login/", {"username": user.username, "password": password}).status_code

    login_throttle.forgive(user.username)
    clock.time = lambda: 1_000_000.0 + 800
    for _ in range(2):
        assert sign_in("guess") == 200
    clock.time = lambda: 1_000_000.0 + 1000  # the unlock's own period is over, the new lockout's not
    assert sign_in(PASSWORD) == 429
    clock.time = lambda: 1_000_000.0 + 1000 + 900 + 1
    assert sign_in(PASSWORD) == 302
    clock.time = lambda: 1_000_000.0 + 1000 + 2 * 900 + 2
    assert cache.get(round_key) is None


def test_a_username_no_cache_key_could_hold_still_counts_towards_a_lockout(client, user, settings):
    # Spaces, control characters and 150 characters: memcached refuses such keys, and Django warns.
    settings.LOGIN_MAX_FAILURES = 2
    odd = "dr \x07" + "x" * 146
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        for _ in range(2):
            assert client.post("/accounts/login/", {"username": odd, "password": "x"}).status_code == 200
        assert client.post("/accounts/login/", {"username": odd, "password": "x"}).status_code == 429
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302


def test_an_empty_password_is_asked_for_and_never_counts_as_a_guess(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 2
    for _ in range(3):  # Enter pressed before the password manager filled the field
        empty = client.post("/accounts/login/", {"username": user.username, "password": ""})
        assert empty.status_code == 200 and "Enter your password." in empty.content.decode()
        assert APIClient().post("/api/auth/token/", {"username": user.username, "password": ""}).status_code == 400
    client.force_login(user)
    for _ in range(3):
        form_id = re.search(r'name="form_id" value="([^"]+)"', client.get("/account/api-token/").content.decode())[1]
        asked = client.post("/account/api-token/", {"action": "issue", "password": "", "form_id": form_id})
        assert asked.status_code == 400 and "Enter your current password" in asked.content.decode()
        new = {"new_password1": "a-Fresh-passphrase-42", "new_password2": "a-Fresh-passphrase-42"}
        assert client.post("/accounts/password_change/", {"old_password": "", **new}).status_code == 200
    assert Client().post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302


def test_behind_a_proxy_failures_count_per_client_not_per_proxy(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 2
    settings.CLIENT_IP_HEADER = "HTTP_X_REAL_IP"
    for _ in range(2):
        client.post("/accounts/login/", {"username": user.username, "password": "x"}, HTTP_X_REAL_IP="203.0.113.9")
    attacker = client.post(
        "/accounts/login/", {"username": user.username, "password": PASSWORD}, HTTP_X_REAL_IP="203.0.113.9"
    )
    assert attacker.status_code == 429
    colleague = Client().post(
        "/accounts/login/", {"username": user.username, "password": PASSWORD}, HTTP_X_REAL_IP="198.51.100.7"
    )
    assert colleague.status_code == 302


def test_a_client_cannot_escape_the_lockout_by_making_up_addresses(user, settings):
    """Behind a proxy that appends the peer to X-Forwarded-For, the first entry is the client's own
    invention; and one IPv6 machine holds a whole /64, each address of which used to count afresh."""
    settings.LOGIN_MAX_FAILURES = 3
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 5
    settings.CLIENT_IP_HEADER = "HTTP_X_FORWARDED_FOR"
    guess = {"username": user.username, "password": "x"}
    for n in range(4):
        Client().post("/accounts/login/", guess, HTTP_X_FORWARDED_FOR=f"10.9.9.{n}, 203.0.113.9")
    right = {"username": user.username, "password": PASSWORD}
    assert Client().post("/accounts/login/", right, HTTP_X_FORWARDED_FOR="10.9.9.99, 203.0.113.9").status_code == 429
    assert Client().post("/accounts/login/", right, HTTP_X_FORWARDED_FOR="203.0.113.10").status_code == 302

    settings.CLIENT_IP_HEADER = "REMOTE_ADDR"
    other = UserFactory()
    for host in range(1, 7):  # six names guessed from six addresses of one /64: past the address's limit
        Client(REMOTE_ADDR=f"2001:db8:0:1::{host:x}").post(
            "/accounts/login/", {"username": f"n{host}", "password": "x"}
        )
    assert _sign_in(Client(REMOTE_ADDR="2001:db8:0:1::ff"), other.username) == 429
    assert _sign_in(Client(REMOTE_ADDR="2001:db8:0:2::1"), other.username) == 302  # the next /64: another client
    out = io.StringIO()
    call_command("clear_address_lockout", "2001:db8:0:1::3", stdout=out)
    assert out.getvalue() == "2001:db8:0:1::3 (counted as 2001:db8:0:1::/64): sign-in lockout cleared\n"
    assert _sign_in(Client(REMOTE_ADDR="2001:db8:0:1::ff"), other.username) == 302
    for host in range(1, 7):  # the network it names, as it printed it, clears the same count
        Client(REMOTE_ADDR=f"2001:db8:0:1::{host:x}").post(
            "/accounts/login/", {"username": f"n{host}", "password": "x"}
        )
    assert _sign_in(Client(REMOTE_ADDR="2001:db8:0:1::ff"), other.username) == 429
    call_command("clear_address_lockout", "2001:db8:0:1::/64", stdout=io.StringIO())
    assert _sign_in(Client(REMOTE_ADDR="2001:db8:0:1::ff"), other.username) == 302
    for refused in ("2001:db8:0:1::/48", "10.0.0.0/24", "10.0.0.1:443"):
        with pytest.raises(CommandError, match="is not an IP address"):
            call_command("clear_address_lockout", refused)


def test_successful_login_clears_the_failure_count(user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    for _ in range(2):  # two typos before each success: five failures in all would lock out
        for _ in range(2):
            Client().post("/accounts/login/", {"username": user.username, "password": "wrong"})
        assert Client().post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302


def test_a_web_sign_in_ends_with_the_browser_and_after_a_shift(client, user):
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    cookie = client.cookies["sessionid"]
    assert not cookie["expires"] and not cookie["max-age"], "a browser-session cookie, not a persistent one"
    assert client.session.get_expiry_age() == 12 * 3600

    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))  # the shift is over
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_there_is_no_public_password_reset_by_email(client, user):
    # Accounts are made by an administrator; a public reset form would let anyone flood staff with mail.
    for path in ("/accounts/password_reset/", "/accounts/password_reset/done/", "/accounts/reset/done/"):
        assert client.post(path, {"email": user.email or "someone@example.org"}).status_code == 404, path


def test_api_token_endpoint_is_rate_limited(db, user, monkeypatch):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"login": "3/minute"})
    api = APIClient()
    codes = [api.post("/api/auth/token/", {"username": user.username, "password": "x"}).status_code for _ in range(4)]
    assert codes == [400, 400, 400, 429]


def test_api_is_rate_limited_per_token(api_client, monkeypatch):
    from rest_framework.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "5/minute", "anon": "5/minute"})
    codes = [api_client.get("/api/analyses/").status_code for _ in range(6)]
    assert codes[:5] == [200] * 5 and codes[5] == 429
    colleague = APIClient()  # another lab system's key has its own allowance
    colleague.force_authenticate(UserFactory())
    assert colleague.get("/api/analyses/").status_code == 200


def test_forms_require_csrf(user):
    strict = Client(enforce_csrf_checks=True)
    strict.login(username=user.username, password=PASSWORD)
    assert strict.post("/upload/", {"images": [upload()]}).status_code == 403
    page = strict.get("/upload/")
    assert 'name="csrfmiddlewaretoken"' in page.content.decode()


def test_session_api_writes_require_csrf_but_token_writes_do_not(user):
    session_api = APIClient(enforce_csrf_checks=True)
    session_api.login(username=user.username, password=PASSWORD)
    assert session_api.post("/api/analyses/", {"image": upload()}).status_code == 403
    token_api = APIClient(enforce_csrf_checks=True)  # a lab system has no CSRF cookie, and needs none
    token_api.credentials(HTTP_AUTHORIZATION=f"Token {api_key(user)}")
    assert token_api.post("/api/analyses/", {"image": upload()}).status_code == 202


def test_healthz_reports_database_and_broker(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_answers_with_its_slash_too_and_over_plain_http(client, db, settings):
    """/healthz/ was the site's 404 page: a monitor set up with the slash saw the site as down."""
    settings.SECURE_SSL_REDIRECT = True  # a probe inside the network speaks plain HTTP
    for path in ("/healthz", "/healthz/"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}, path


def test_the_token_endpoint_shares_the_sign_in_lockout(client, user, settings):
    """Guessing passwords through the API must not get around the web sign-in's limit, nor the reverse."""
    settings.LOGIN_MAX_FAILURES = 3
    api = APIClient()
    for _ in range(2):
        assert api.post("/api/auth/token/", {"username": user.username, "password": "x"}).status_code == 400
    assert client.post("/accounts/login/", {"username": user.username, "password": "x"}).status_code == 200
    blocked = api.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert blocked.status_code == 429 and "Too many failed sign-in attempts" in blocked.json()["detail"]
    assert "token" not in blocked.json()
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 429


def test_the_password_change_form_shares_the_sign_in_lockout(client, user, settings):
    """A workstation left signed in is no place to guess its user's password at leisure."""
    settings.LOGIN_MAX_FAILURES = 3
    client.force_login(user)
    new = {"new_password1": "a-Fresh-passphrase-42", "new_password2": "a-Fresh-passphrase-42"}
    weak = client.post(
        "/accounts/password_change/", {"old_password": PASSWORD, "new_password1": "1", "new_password2": "1"}
    )
    assert weak.status_code == 200  # a weak new password is refused, but is no guess at the old one
    for _ in range(3):
        wrong = client.post("/accounts/password_change/", {"old_password": "guess", **new})
        assert wrong.status_code == 200 and "old password was entered incorrectly" in wrong.content.decode()
    blocked = client.post("/accounts/password_change/", {"old_password": PASSWORD, **new})
    assert blocked.status_code == 429 and "Too many failed sign-in attempts" in blocked.content.decode()
    user.refresh_from_db()
    assert user.check_password(PASSWORD)
    assert Client().post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 429


def test_a_password_change_clears_the_failure_count(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 2
    client.force_login(user)
    new = {"new_password1": "a-Fresh-passphrase-42", "new_password2": "a-Fresh-passphrase-42"}
    client.post("/accounts/password_change/", {"old_password": "typo", **new})
    assert client.post("/accounts/password_change/", {"old_password": PASSWORD, **new}).status_code == 302
    Client().post("/accounts/login/", {"username": user.username, "password": "typo"})
    login = Client().post("/accounts/login/", {"username": user.username, "password": new["new_password1"]})
    assert login.status_code == 302


def test_a_correct_password_on_the_token_endpoint_clears_the_failure_count(user, settings):
    settings.LOGIN_MAX_FAILURES = 2
    api = APIClient()
    api.post("/api/auth/token/", {"username": user.username, "password": "x"})
    assert api.post("/api/auth/token/", {"username": user.username, "password": PASSWORD}).status_code == 200
    api.post("/api/auth/token/", {"username": user.username, "password": "x"})
    assert api.post("/api/auth/token/", {"username": user.username, "password": PASSWORD}).status_code == 200


def test_form_and_json_bodies_are_capped_far_below_an_image_batch(client, db):
    """Only multipart file parts may be large; a huge form field is refused, not read into memory."""
    huge_field = "username=a&password=" + "x" * 3_000_000
    response = client.post("/accounts/login/", huge_field, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert "form fields (everything but the image files) exceed" in response.content.decode()
    api = APIClient().post("/api/auth/token/", huge_field, content_type="application/x-www-form-urlencoded")
    assert api.status_code == 400 and "exceed 2621440 bytes" in api.json()["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "/?search=a%00b",
        "/batches/?search=%00",
        "/api/analyses/?label=%00",
        "/api/batches/?sample_reference=a%00",
        "/admin/diagnosis/analysis/?q=%00",
        "/admin/diagnosis/batch/?owner__id__exact=%00",
    ],
)
def test_a_nul_character_in_the_query_is_refused_with_a_message(admin_user, url):
    """PostgreSQL cannot compare text holding NUL: such a search would otherwise end in a 500."""
    for client in (Client(), APIClient()):
        client.force_login(admin_user)
        response = client.get(url)
        assert response.status_code == 400, url
        assert response.json()["detail"] == "The query string must not contain NUL characters."


def test_signed_in_pages_are_never_kept_in_the_browser_cache(client, user):
    """After sign-out on a shared workstation, Back must not show the last user's patient pages."""
    client.force_login(user)
    for url in ("/", "/batches/", "/upload/", "/api/analyses/"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"], url


def test_a_sign_in_left_idle_ends_and_the_pages_polling_does_not_keep_it_alive(client, user):
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    assert client.get("/").status_code == 200

    def idle_for(minutes: int) -> None:
        session = client.session
        session["last_activity"] = int(time.time()) - minutes * 60
        session.save()

    idle_for(29)
    assert client.get("/status.json?ids=1").status_code == 200  # the page polling on its own
    assert time.time() - client.session["last_activity"] > 28 * 60
    assert client.get("/batches/").status_code == 200  # the user doing something
    assert time.time() - client.session["last_activity"] < 60

    idle_for(32)
    assert client.get("/status.json?ids=1").status_code == 401
    page = client.get("/", follow=True)
    assert page.redirect_chain[-1][0].startswith("/accounts/login/")
    assert "You were signed out after 30 minutes without activity. Sign in again." in page.content.decode()


def test_a_busy_sign_in_still_ends_when_its_hours_are_up(client, user):
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    session = client.session
    session["signed_in_at"] -= 12 * 3600 - 30  # signed in nearly a shift ago, active all along
    session.save()
    assert client.get("/").status_code == 200
    session = client.session
    session["signed_in_at"] -= 60
    session.save()
    page = client.get("/batches/", follow=True)
    assert page.redirect_chain[-1][0].startswith("/accounts/login/")
    assert "Your sign-in ended after 12 hours. Sign in again." in page.content.decode()


def test_error_pages_say_what_happened_and_lead_back(client, user):
    from django.test import RequestFactory
    from django.views.defaults import server_error

    client.force_login(user)
    missing = client.get("/analyses/987654/")
    assert missing.status_code == 404 and "Back to your analyses" in missing.content.decode()
    assert "There is nothing here for you" in missing.content.decode()

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    expired = strict.post("/upload/", {"images": [upload()]})
    assert expired.status_code == 403 and "The form had expired" in expired.content.decode()
    assert "Nothing was stored" in expired.content.decode()

    crashed = server_error(RequestFactory().get("/"))
    assert crashed.status_code == 500 and "Something went wrong" in crashed.content.decode()


def test_pages_carry_a_content_security_policy_and_the_api_docs_need_no_other_site(client, user):
    client.force_login(user)
    policy = client.get("/")["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy and "unsafe-eval" not in policy
    docs = Client().get("/api/docs/")
    body = docs.content.decode()
    assert docs["Content-Security-Policy"] == policy
    assert '<redoc spec-url="/api/schema/">' in body and "<script>" not in body
    assert "http://" not in body and "https://" not in body  # no CDN, no web fonts


def test_one_address_trying_a_password_on_every_account_is_stopped(db, settings):
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 4
    accounts = [UserFactory() for _ in range(5)]
    for account in accounts[:4]:  # one guess each: no username reaches its own limit
        assert (
            Client().post("/accounts/login/", {"username": account.username, "password": "Summer2026"}).status_code
            == 200
        )
    sprayed = Client().post("/accounts/login/", {"username": accounts[4].username, "password": PASSWORD})
    assert sprayed.status_code == 429
    elsewhere = Client(REMOTE_ADDR="198.51.100.7")
    assert (
        elsewhere.post("/accounts/login/", {"username": accounts[4].username, "password": PASSWORD}).status_code == 302
    )


def test_signing_in_again_after_the_idle_limit_says_nothing_about_being_signed_out(client, user):
    assert client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}).status_code == 302
    session = client.session
    session["last_activity"] -= 3600
    session.save()
    page = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD}, follow=True)
    assert page.status_code == 200 and "signed out" not in page.content.decode()
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("path", ["/accounts/logout/", "/admin/logout/"])
def test_signing_out_says_so_on_the_sign_in_page(client, path, db):
    """Log out led to a bare sign-in form, identical to the one before signing in: on a shared
    workstation nothing confirmed that the session had really ended."""
    staff = UserFactory(is_staff=True, username="ward7-nurse")
    client.force_login(staff)
    page = client.post(path, follow=True)
    assert page.redirect_chain == [("/accounts/login/", 302)]
    text = page.content.decode()
    assert '<p class="flash info" role="status">You are signed out.</p>' in text
    assert "ward7-nurse" not in text and client.get("/").status_code == 302
    assert "signed out" not in client.get("/accounts/login/").content.decode()  # said once
    client.post("/accounts/login/", {"username": staff.username, "password": PASSWORD})
    assert "signed out" not in client.get("/").content.decode()


@pytest.mark.parametrize("path", ["/accounts/logout/", "/admin/logout/"])
def test_signing_out_past_the_idle_limit_says_one_thing_and_never_signed_in(client, path, db):
    """The admin's sign-out, unnamed, was not exempt: past the limit it showed both "You were signed
    out after 30 minutes" and "You are signed out.". And the sign-out page opened with GET said
    "You are signed in as ..." for a sign-in the site had ended."""
    staff = UserFactory(is_staff=True, username="ward7-nurse")
    for method in ("post", "get"):
        client.force_login(staff)
        session = client.session
        session["last_activity"] = int(time.time()) - 40 * 60
        session.save()
        page = getattr(client, method)(path, follow=True)
        assert page.redirect_chain[-1][0].startswith("/accounts/login/"), (method, page.redirect_chain)
        flashes = re.findall(r'<p class="flash[^"]*" role="[a-z]+">([^<]*)</p>', page.content.decode())
        assert len(flashes) == 1 and "ward7-nurse" not in page.content.decode(), (method, flashes)


@pytest.mark.parametrize("path", ["/accounts/logout/", "/admin/logout/"])
def test_the_sign_out_address_opened_in_the_browser_asks_to_sign_out(path, user):
    """GET /accounts/logout/ (a bookmark, a typed address, an old link) answered 405 with an empty
    body: Chrome showed "This page isn't working - HTTP ERROR 405", no way back, still signed in."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    page = browser.get(path)
    text = page.content.decode()
    assert page.status_code == 200 and "<title>Sign out · Malaria cell screening</title>" in text
    assert f"You are signed in as {user.username}." in text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', text)[1]
    assert re.search(r'<form method="post">.*<button type="submit">Sign out</button></form>', text)
    signed_out = browser.post(path, {"csrfmiddlewaretoken": token}, follow=True)
    assert "You are signed out." in signed_out.content.decode() and browser.get("/").status_code == 302
    assert browser.get(path).url == "/accounts/login/"  # nobody to sign out: to the sign-in page


def test_the_admins_password_change_page_shares_the_sign_in_lockout(client, db, settings):
    settings.LOGIN_MAX_FAILURES = 3
    staff = UserFactory(is_staff=True)
    client.force_login(staff)
    new = {"new_password1": "a-Fresh-passphrase-42", "new_password2": "a-Fresh-passphrase-42"}
    for _ in range(3):
        wrong = client.post("/admin/password_change/", {"old_password": "guess", **new})
        assert wrong.status_code == 200 and "old password was entered incorrectly" in wrong.content.decode()
    blocked = client.post("/admin/password_change/", {"old_password": PASSWORD, **new})
    assert blocked.status_code == 429
    staff.refresh_from_db()
    assert staff.check_password(PASSWORD)
    client.logout()
    assert client.get("/admin/password_change/").status_code == 302  # still the admin's: staff only


def test_look_alike_spellings_of_a_username_share_its_failure_count(client, user, settings):
    settings.LOGIN_MAX_FAILURES = 3
    name = user.username
    fullwidth = [name[:k] + chr(ord(name[k]) + 0xFEE0) + name[k + 1 :] for k in range(3)]  # "ｕser1", ...
    for spelling in fullwidth:
        client.post("/accounts/login/", {"username": spelling, "password": "wrong"})
    assert client.post("/accounts/login/", {"username": name, "password": PASSWORD}).status_code == 429


def _sign_in(browser: Client, username: str, path: str = "/accounts/login/") -> int:
    return browser.post(path, {"username": username, "password": PASSWORD}).status_code


def _sign_in_and_out(browser: Client, username: str, path: str = "/accounts/login/") -> None:
    assert _sign_in(browser, username, path) == 302
    assert browser.post("/accounts/logout/").status_code == 302  # the cookie that remembers the browser stays


def test_a_browser_signed_in_before_is_not_locked_out_by_guesses_from_its_address(db, settings):
    # A hospital's staff share one address: guesses from there must not lock out the staff's own browsers.
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 3
    clinician, reviewer = UserFactory(), UserFactory(is_staff=True)
    clinicians_browser, reviewers_browser = Client(), Client()
    _sign_in_and_out(clinicians_browser, clinician.username)
    _sign_in_and_out(reviewers_browser, reviewer.username, path="/admin/login/")
    for _ in range(3):
        Client().post("/accounts/login/", {"username": "guess", "password": "Summer2026"})
    assert _sign_in(Client(), clinician.username) == 429  # a new browser
    assert _sign_in(clinicians_browser, clinician.username) == 302
    assert _sign_in(reviewers_browser, reviewer.username, path="/admin/login/") == 302
    # It is known for its own user only, and a cookie not signed by this server counts for nothing.
    assert _sign_in(clinicians_browser, reviewer.username) == 429
    forged = Client()
    forged.cookies["known_device"] = clinicians_browser.cookies["known_device"].value.split(":")[0]
    assert _sign_in(forged, clinician.username) == 429


def test_typos_on_a_known_browser_count_against_its_user_not_its_address(db, settings):
    settings.LOGIN_MAX_FAILURES = 3
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 2
    clinician, colleague = UserFactory(), UserFactory()
    browser = Client()
    _sign_in_and_out(browser, clinician.username)
    for _ in range(2):
        assert browser.post("/accounts/login/", {"username": clinician.username, "password": "typo"}).status_code == 200
    assert _sign_in(Client(), colleague.username) == 302
    browser.post("/accounts/login/", {"username": clinician.username, "password": "typo"})
    assert _sign_in(browser, clinician.username) == 429  # its own limit still holds


def test_guesses_from_elsewhere_at_the_address_do_not_lock_a_known_browsers_user_out(db, settings):
    settings.LOGIN_MAX_FAILURES = 3
    clinician = UserFactory()
    clinicians_browser = Client()
    _sign_in_and_out(clinicians_browser, clinician.username)
    stranger = Client()  # the same address (the hospital's NAT), another browser
    for _ in range(3):
        stranger.post("/accounts/login/", {"username": clinician.username, "password": "Summer2026"})
    assert _sign_in(stranger, clinician.username) == 429
    assert _sign_in(Client(), clinician.username) == 429, "an unknown browser there is still locked out"
    assert _sign_in(clinicians_browser, clinician.username) == 302


def test_a_known_browser_gives_no_extra_guesses_at_an_account_whose_name_differs_in_case(db, settings):
    """Sign-in names are case-sensitive: "Alice" is another account, and signing in as "alice"
    neither exempts guesses at it from the address's limit nor clears their count."""
    settings.LOGIN_MAX_FAILURES = 3
    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 6
    owner, target = UserFactory(username="alice"), UserFactory(username="Alice")
    browser = Client()
    _sign_in_and_out(browser, owner.username)
    refused = 0
    for _ in range(4):
        for _ in range(2):
            guess = browser.post("/accounts/login/", {"username": target.username, "password": "Summer2026"})
            refused += guess.status_code == 429
        _sign_in_and_out(browser, owner.username)
    assert refused >= 2, "eight guesses at Alice: the limit per username and address stops them"
    assert _sign_in(Client(), target.username) == 429


def test_the_device_cookie_does_not_say_who_signed_in_on_the_browser(db):
    clinician = UserFactory(username="dr.rahman")
    browser = Client()
    _sign_in_and_out(browser, clinician.username)
    cookie = browser.cookies["known_device"].value
    assert hashlib.sha256(b"dr.rahman").hexdigest()[:32] not in cookie and "rahman" not in cookie


def test_ended_sign_ins_are_removed_every_night(db, settings):
    from diagnosis import tasks

    user = UserFactory()
    ended, current = Client(), Client()
    ended.force_login(user)
    current.force_login(user)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Session.objects.filter(session_key=ended.session.session_key).update(expire_date=an_hour_ago)
    tasks.clear_expired_sessions()
    assert list(Session.objects.values_list("session_key", flat=True)) == [current.session.session_key]
    nightly = {entry["task"]: entry for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "diagnosis.tasks.clear_expired_sessions" in nightly
    assert settings.CELERY_TASK_ROUTES["diagnosis.tasks.clear_expired_sessions"]["queue"] == settings.HOUSEKEEPING_QUEUE


def test_the_rate_limit_and_lockout_counters_do_not_name_the_address_or_user(db):
    """Redis keeps its keys on disk (its append-only file): a plain or unkeyed-digest address or
    name there would be a record of who called from where that no retention reaches."""
    from django.core.cache import cache

    user, address = UserFactory(username="dr.rahman"), "203.0.113.7"
    APIClient(REMOTE_ADDR=address).post("/api/auth/token/", {"username": user.username, "password": "wrong"})
    Client(REMOTE_ADDR=address).post("/accounts/login/", {"username": user.username, "password": "wrong"})
    APIClient(REMOTE_ADDR=address).get("/api/schema/")  # served to anyone: every throttle counts it
    keys = " ".join(cache._cache)  # LocMemCache's own keys, as Redis would hold them
    assert "login-failures" in keys and "throttle_anon" in keys and "throttle_user" in keys
    for secret in (address, user.username):
        assert secret not in keys and hashlib.sha256(secret.encode()).hexdigest() not in keys, secret


def test_debug_pages_are_for_this_machine_whatever_host_a_client_names(client, settings):
    """ALLOWED_HOSTS checks the Host header, which a client elsewhere on the network can set."""
    settings.DEBUG = True
    from_the_network = client.get("/accounts/login/", REMOTE_ADDR="192.168.1.20", HTTP_HOST="localhost")
    assert from_the_network.status_code == 403 and b"serves this machine only" in from_the_network.content
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert client.get("/accounts/login/", REMOTE_ADDR=address, HTTP_HOST="localhost").status_code == 200
    settings.DEBUG = False  # production: the proxy's and the clients' addresses are all served
    assert client.get("/accounts/login/", REMOTE_ADDR="192.168.1.20").status_code == 200


def test_a_browser_remembered_before_browsers_had_ids_is_still_known(db, settings):
    """A cookie of the earlier form (its users' plain lower-cased digests): ward browsers are not
    all strangers after an upgrade, locked out by the next guesses from their address."""
    from django.core.signing import get_cookie_signer

    from diagnosis.login_throttle import DEVICE_COOKIE, DEVICE_COOKIE_SALT

    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 3
    clinician = UserFactory(username="Dr.Rahman")
    old_value = hashlib.sha256(b"dr.rahman").hexdigest()
    browser = Client()
    browser.cookies[DEVICE_COOKIE] = get_cookie_signer(salt=DEVICE_COOKIE + DEVICE_COOKIE_SALT).sign(old_value)
    for _ in range(3):
        Client().post("/accounts/login/", {"username": "guess", "password": "Summer2026"})
    assert _sign_in(Client(), clinician.username) == 429
    assert _sign_in(browser, clinician.username) == 302
    rewritten = browser.cookies[DEVICE_COOKIE].value
    assert "|" in rewritten and old_value not in rewritten, "signing in rewrites it in the new form, whole"
    browser.post("/accounts/logout/")
    assert _sign_in(browser, clinician.username) == 302


def test_the_api_rate_limit_for_anonymous_clients_ignores_a_made_up_forwarded_for(db, monkeypatch):
    from rest_framework.throttling import SimpleRateThrottle

    # DRF reads the rates once, at import: the class's own copy is what a test can change.
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {**SimpleRateThrottle.THROTTLE_RATES, "anon": "2/hour"})
    client = APIClient(REMOTE_ADDR="198.51.100.9")
    answers = [client.get("/api/schema/", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}").status_code for n in range(4)]
    assert answers == [200, 200, 429, 429]


def test_an_administrator_clears_an_address_locked_out_for_guessing_at_many_names(db, settings):
    """One machine behind a ward's shared address guessing at names locks every new browser there
    out; the admin's per-user unlock does not reach it, this command does."""

    settings.LOGIN_MAX_FAILURES_PER_ADDRESS = 3
    clinician = UserFactory()
    ward, elsewhere = Client(REMOTE_ADDR="10.20.0.1"), Client(REMOTE_ADDR="10.20.0.2")
    for name in ("a", "b", "c"):
        ward.post("/accounts/login/", {"username": name, "password": "Summer2026"})
    elsewhere.post("/accounts/login/", {"username": "d", "password": "Summer2026"})
    assert _sign_in(Client(REMOTE_ADDR="10.20.0.1"), clinician.username) == 429

    out = io.StringIO()
    call_command("clear_address_lockout", "10.20.0.1", "10.20.0.9", stdout=out)
    assert out.getvalue().splitlines() == [
        "10.20.0.1: sign-in lockout cleared",
        "10.20.0.9: had no failed sign-ins counted",
    ]
    assert _sign_in(Client(REMOTE_ADDR="10.20.0.1"), clinician.username) == 302
    # The other address's count stays: one more failure there still counts towards its limit.
    for name in ("e", "f"):
        elsewhere.post("/accounts/login/", {"username": name, "password": "Summer2026"})
    assert _sign_in(Client(REMOTE_ADDR="10.20.0.2"), clinician.username) == 429

    ipv6 = Client(REMOTE_ADDR="2001:db8::1")
    for name in ("a", "b", "c"):
        ipv6.post("/accounts/login/", {"username": name, "password": "Summer2026"})
    call_command("clear_address_lockout", "2001:DB8:0::1", stdout=io.StringIO())  # as someone may type it
    assert _sign_in(Client(REMOTE_ADDR="2001:db8::1"), clinician.username) == 302


@pytest.mark.parametrize("scripted", [False, True], ids=["form", "upload.js"])
def test_a_form_from_a_page_opened_under_another_sign_in_does_nothing(client, user, other_user, scripted):
    """forms.js gives an old page the latest sign-in's CSRF token: clinician A's upload page, sent
    after B signed in on the same browser, stored A's patient's images in B's account."""
    client.force_login(user)
    headers = {"X-Requested-With": "XMLHttpRequest"} if scripted else {}
    sent = {"images": [upload("a.png")], "sample_reference": "PATIENT-OF-A", "signed_in_as": str(other_user.pk)}
    refused = client.post("/upload/", sent, headers=headers)
    assert refused.status_code == 409 and not Batch.objects.exists()
    message = refused.json()["detail"] if scripted else refused.content.decode()
    assert "Someone else has signed in on this browser since this page was opened, so nothing was done." in message
    sent |= {"images": [upload("a.png")], "signed_in_as": str(user.pk)}
    assert client.post("/upload/", sent, headers=headers).status_code in (200, 302)
    assert Batch.objects.get().owner == user


def test_a_signed_in_api_upload_is_still_read_by_the_apis_own_parser(client, user):
    """The same-sign-in check read request.POST for the API's POSTs too (it takes the browser's
    session): Django's parser read the body, DRF reused it, and a part without a name was dropped
    from a batch stored with 202, where the API's own parser refuses it."""
    client.force_login(user)
    body = _multipart([_image(b"cell-1.png"), _image(b"cell-2.png"), UNREADABLE_PARTS["no-name"]])
    sent_as = f"multipart/form-data; boundary={BOUNDARY.decode()}"
    answer = client.generic("POST", "/api/batches/", body, content_type=sent_as)
    assert answer.status_code == 400 and "A part of the form could not be read" in answer.json()["detail"]
    assert not Batch.objects.exists()


@pytest.mark.parametrize("typed", ["not-an-address", "10.0.0.256", "10.0.0.5:443"])
def test_clearing_the_lockout_of_something_that_is_no_address_is_refused(db, typed):
    """A typo, or an address copied with its port, "had no failed sign-ins counted" and exited 0:
    the ward's address stayed locked out while the operator thought it never was."""
    with pytest.raises(CommandError, match="is not an IP address"):
        call_command("clear_address_lockout", typed, stdout=io.StringIO())


def test_no_page_may_ask_for_a_camera_microphone_or_location(client, user, settings):
    """The site uses none of them, but nothing told the browser to refuse them to its pages, or
    to a frame an injected tag might open in one."""
    settings.DEBUG = False
    client.force_login(user)
    for url in ("/accounts/login/", "/", "/api/analyses/", "/no-such-page/"):
        policy = client.get(url).headers.get("Permissions-Policy", "")
        assert {"camera=()", "microphone=()", "geolocation=()"} <= set(policy.split(", ")), (url, policy)


def test_a_request_for_another_host_is_a_warning_in_the_log_not_an_error(client, db, settings, caplog):
    """nginx passes on any Host, and Django logged each it does not serve as an ERROR with its
    traceback: every scanner asking for the server's address filled the log and its alerts."""
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["malaria.example.org"]
    with caplog.at_level(logging.INFO):
        assert client.get("/accounts/login/", HTTP_HOST="203.0.113.7").status_code == 400
    (record,) = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    assert (record.levelname, record.exc_info) == ("WARNING", None) and "203.0.113.7" in record.getMessage()
