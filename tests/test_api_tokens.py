"""API tokens: one per user, stored only as a digest, renewed by a POST, revoked by DELETE."""

import unicodedata
from datetime import timedelta

import pytest
from django.contrib.sessions.models import Session
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from diagnosis.models import ApiToken
from diagnosis.tokens import USE_RECORDED_EVERY, digest
from tests.factories import PASSWORD, UserFactory


def issue(user, password: str = PASSWORD) -> dict:
    response = APIClient().post("/api/auth/token/", {"username": user.username, "password": password})
    assert response.status_code == 200, response.content
    return response.json()


def status_with(key: str) -> int:
    return APIClient().get("/api/analyses/", HTTP_AUTHORIZATION=f"Token {key}").status_code


def age(key: str, days: int) -> None:
    ApiToken.objects.filter(digest=digest(key)).update(created=timezone.now() - timedelta(days=days))


def test_a_post_issues_a_key_that_says_when_it_expires_and_replaces_the_last(settings, user):
    settings.API_TOKEN_DAYS = 30
    first = issue(user)
    assert status_with(first["token"]) == 200
    expires = parse_datetime(first["expires_at"])
    assert abs(expires - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)
    second = issue(user)
    assert second["token"] != first["token"] and status_with(second["token"]) == 200
    assert status_with(first["token"]) == 401 and ApiToken.objects.filter(user=user).count() == 1


def test_the_database_holds_no_working_key(user):
    key = issue(user)["token"]
    stored = ApiToken.objects.get(user=user)
    assert stored.digest == digest(key) and stored.hint == key[-4:]
    columns = [str(value) for value in ApiToken.objects.filter(user=user).values().get().values()]
    assert not any(key in value for value in columns)
    assert status_with(stored.digest) == 401  # the stored digest is not itself a key


def test_an_expired_token_is_refused_with_a_reason_and_a_post_renews_it(settings, user):
    settings.API_TOKEN_DAYS = 30
    old = issue(user)["token"]
    age(old, 29)
    assert status_with(old) == 200
    age(old, 31)
    refused = APIClient().get("/api/analyses/", HTTP_AUTHORIZATION=f"Token {old}")
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    new = issue(user)["token"]
    assert new != old and status_with(new) == 200 and status_with(old) == 401


def test_expires_at_is_written_in_the_time_zone_of_every_other_time(settings, user):
    from diagnosis import services
    from tests.factories import upload

    settings.TIME_ZONE = "Africa/Nairobi"
    issued = issue(user)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {issued['token']}")
    batch = services.create_batch(owner=user, uploads=[upload()])
    created_at = api.get(f"/api/batches/{batch.pk}/").json()["created_at"]
    assert created_at.endswith("+03:00") and issued["expires_at"].endswith("+03:00"), issued["expires_at"]
    assert parse_datetime(issued["expires_at"]) - timezone.now() > timedelta(days=settings.API_TOKEN_DAYS - 1)


def test_a_period_of_zero_never_expires(settings, user):
    settings.API_TOKEN_DAYS = 0
    key = issue(user)["token"]
    age(key, 3650)
    assert status_with(key) == 200 and issue(user)["expires_at"] is None


def test_a_deactivated_users_key_stops_working_and_stays_stopped_when_reactivated(user, admin_client):
    """Deactivating is how an account is cut off (someone left, a key leaked): reactivating it later
    must not bring back a key that was copied before."""
    key = issue(user)["token"]
    user.is_active = False
    user.save()
    assert status_with(key) == 401 and not ApiToken.objects.filter(user=user).exists()
    user.is_active = True
    user.save()
    assert status_with(key) == 401

    again = issue(user)["token"]
    form = {"username": user.username, "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    assert admin_client.post(f"/admin/auth/user/{user.pk}/change/", form).status_code == 302  # is_active unticked
    user.refresh_from_db()
    assert not user.is_active and not ApiToken.objects.filter(user=user).exists() and status_with(again) == 401


def test_a_key_of_an_account_deactivated_in_bulk_stays_stopped_when_reactivated(user):
    """A leavers' script deactivates with update(), which sends no signal: the key is refused, and
    reactivating the account (its own save) must not bring it back, used in between or not."""
    from django.contrib.auth import get_user_model

    for tried_in_between in (False, True):
        key = issue(user)["token"]
        get_user_model().objects.filter(pk=user.pk).update(is_active=False)
        if tried_in_between:
            assert status_with(key) == 401
        user.refresh_from_db()
        user.is_active = True
        user.save()
        assert status_with(key) == 401, f"revived (used while inactive: {tried_in_between})"


def test_a_deactivated_accounts_sign_ins_stay_ended_when_it_is_reactivated(user):
    """Django only ignores an inactive account's sessions: reactivated after a suspected leak, the
    browser that may have been the leak's was signed in again, by the save or after a bulk update()."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    colleague = UserFactory()
    theirs = Client()
    theirs.force_login(colleague)
    for bulk in (False, True):
        browser = Client()
        browser.force_login(user)
        assert browser.get("/").status_code == 200
        if bulk:
            get_user_model().objects.filter(pk=user.pk).update(is_active=False)
        else:
            user.is_active = False
            user.save()
        assert browser.get("/").status_code == 302
        user.refresh_from_db()
        user.is_active = True
        user.save()
        assert browser.get("/").status_code == 302, f"signed in again (deactivated in bulk: {bulk})"
    assert theirs.get("/").status_code == 200  # another account's sign-in is left alone


def test_use_is_recorded_at_most_every_few_minutes(user):
    key = issue(user)["token"]
    assert ApiToken.objects.get(user=user).last_used_at is None
    assert status_with(key) == 200
    first_use = ApiToken.objects.get(user=user).last_used_at
    assert first_use is not None and timezone.now() - first_use < timedelta(minutes=1)
    assert status_with(key) == 200
    assert ApiToken.objects.get(user=user).last_used_at == first_use  # no write on every request
    ApiToken.objects.filter(user=user).update(last_used_at=first_use - USE_RECORDED_EVERY)
    assert status_with(key) == 200
    assert ApiToken.objects.get(user=user).last_used_at > first_use


def test_delete_revokes_only_the_callers_token(user):
    mine, theirs = issue(user)["token"], issue(UserFactory())["token"]
    client = APIClient()
    assert client.delete("/api/auth/token/").status_code == 401  # nobody to revoke for
    assert client.delete("/api/auth/token/", HTTP_AUTHORIZATION=f"Token {mine}").status_code == 204
    assert status_with(mine) == 401 and status_with(theirs) == 200
    assert issue(user)["token"] != mine


@pytest.mark.parametrize("password", ["wrong", ""])
def test_bad_credentials_issue_nothing(user, password):
    response = APIClient().post("/api/auth/token/", {"username": user.username, "password": password})
    assert response.status_code == 400 and response.json()["detail"]
    assert not ApiToken.objects.filter(user=user).exists()


def test_the_account_page_issues_a_key_once_shows_its_expiry_and_revokes_it(client, settings, user, other_user):
    settings.API_TOKEN_DAYS = 30
    theirs = issue(other_user)["token"]
    client.force_login(user)
    empty = client.get("/account/api-token/").content.decode()
    assert "You have no API token." in empty

    def form_id(page: str) -> str:
        return page.split('name="form_id" value="')[1].split('"')[0]

    refused = client.post("/account/api-token/", {"action": "issue", "password": "not-mine", "form_id": form_id(empty)})
    assert refused.status_code == 400 and "That is not your password" in refused.content.decode()
    assert not ApiToken.objects.filter(user=user).exists()

    sent = {"action": "issue", "password": PASSWORD, "form_id": form_id(refused.content.decode())}
    response = client.post("/account/api-token/", sent)
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    page = response.content.decode()
    key = page.split('<code id="token-key">')[1].split("</code>")[0]
    assert ApiToken.objects.get(user=user).digest == digest(key) and status_with(key) == 200
    assert not any(key in str(s.get_decoded()) for s in Session.objects.all())  # only a digest is ever kept
    # Reloading that page sends the same form again: no other key, and the one copied still works.
    reloaded = client.post("/account/api-token/", sent, follow=True).content.decode()
    assert "That form had been used already, so no key was issued: use the one below." in reloaded
    assert status_with(key) == 200

    later = client.get("/account/api-token/").content.decode()
    assert key not in later and f"…{key[-4:]}" in later  # the whole key is shown only once
    until = timezone.localtime(ApiToken.objects.get(user=user).created + timedelta(days=30))
    assert f"It works until {until:%Y-%m-%d %H:%M}." in later
    last_used = timezone.localtime(ApiToken.objects.get(user=user).last_used_at)
    assert f"Last used {last_used:%Y-%m-%d %H:%M}." in later

    replaced = client.post("/account/api-token/", {"action": "issue", "password": PASSWORD, "form_id": form_id(later)})
    replaced = replaced.content.decode()
    new = replaced.split('<code id="token-key">')[1].split("</code>")[0]
    assert new != key and status_with(key) == 401 and status_with(new) == 200

    age(new, 31)
    assert "It has expired" in client.get("/account/api-token/").content.decode()
    asked = client.post("/account/api-token/", {"action": "revoke"})
    assert asked.status_code == 200 and "Revoke the API token?" in asked.content.decode()
    assert ApiToken.objects.filter(user=user).exists()  # one slip of the finger cuts no lab system off
    confirmed = {"action": "revoke", "confirmed": "yes"}
    revoked = client.post("/account/api-token/", confirmed, follow=True).content.decode()
    assert "API token revoked" in revoked and "You have no API token." in revoked
    assert status_with(new) == 401 and status_with(theirs) == 200


@pytest.mark.django_db(transaction=True)
def test_keys_issued_in_plain_text_before_the_upgrade_keep_working_and_are_erased(user):
    """DRF's authtoken table, as an earlier release left it, is carried over as digests and emptied."""
    plain_key = "0123456789abcdef0123456789abcdef01234567"
    executor = MigrationExecutor(connection)
    executor.migrate([("diagnosis", "0005_batch_callback")])
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY,"
                " created timestamp with time zone NOT NULL, user_id integer NOT NULL)"
            )
            cursor.execute(
                "INSERT INTO authtoken_token (key, created, user_id) VALUES (%s, %s, %s)",
                [plain_key, timezone.now().isoformat(), user.pk],
            )
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM authtoken_token")
            assert cursor.fetchone()[0] == 0
        assert status_with(plain_key) == 200
        assert ApiToken.objects.get(user=user).hint == plain_key[-4:]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS authtoken_token")


def test_a_client_still_sending_its_expired_key_can_get_a_new_one(settings, user):
    settings.API_TOKEN_DAYS = 30
    old = issue(user)["token"]
    age(old, 31)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {old}")  # set once as a default, as HTTP clients do
    renewed = client.post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert renewed.status_code == 200 and status_with(renewed.json()["token"]) == 200


def test_a_new_password_ends_the_api_key_but_signing_in_does_not(client, user, settings):
    from django.contrib.auth.hashers import make_password

    key = issue(user)["token"]
    # Django re-hashes an unchanged password on sign-in when it was stored with an older hasher.
    settings.PASSWORD_HASHERS = [*settings.PASSWORD_HASHERS, "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher"]
    type(user).objects.filter(pk=user.pk).update(password=make_password(PASSWORD, hasher="pbkdf2_sha1"))
    assert client.login(username=user.username, password=PASSWORD)
    user.refresh_from_db()
    assert user.password.startswith("md5$") and status_with(key) == 200

    response = client.post(
        "/accounts/password_change/",
        {"old_password": PASSWORD, "new_password1": "a-new-pass-phrase-42", "new_password2": "a-new-pass-phrase-42"},
    )
    assert response.status_code == 302 and status_with(key) == 401

    fresh = issue(user, password="a-new-pass-phrase-42")["token"]
    user.refresh_from_db()
    user.set_password("set-by-an-admin-77")
    user.save()
    assert status_with(fresh) == 401

    last = issue(user, password="set-by-an-admin-77")["token"]
    user.refresh_from_db()
    user.set_unusable_password()  # an admin locks the account's password
    user.save()
    assert status_with(last) == 401


def test_a_key_can_be_issued_from_either_of_two_open_account_pages(client, user):
    client.force_login(user)

    def form_id() -> str:
        return client.get("/account/api-token/").content.decode().split('name="form_id" value="')[1].split('"')[0]

    first_tab, second_tab = form_id(), form_id()
    issued = client.post("/account/api-token/", {"action": "issue", "password": PASSWORD, "form_id": first_tab})
    assert issued.status_code == 200 and '<code id="token-key">' in issued.content.decode()
    again = client.post("/account/api-token/", {"action": "issue", "password": PASSWORD, "form_id": second_tab})
    assert again.status_code == 200 and '<code id="token-key">' in again.content.decode()
    assert client.post("/account/api-token/", {"action": "issue", "password": PASSWORD}).status_code == 302


def test_the_token_post_reads_a_user_name_as_the_web_sign_in_does(client, settings, db):
    """The web sign-in reads the name NFKC-normalised, and the lockout counts under that form; the
    token POST took it as sent, so a lab system sending "Müller" decomposed (as a Mac keeps it) was
    refused with the right password, and a few retries locked Müller out of the web as well."""
    settings.LOGIN_MAX_FAILURES = 3
    name = unicodedata.normalize("NFC", "MüllerĐurić")
    UserFactory(username=name)
    sent = {"username": unicodedata.normalize("NFD", name), "password": PASSWORD}
    codes = [APIClient().post("/api/auth/token/", sent).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    assert client.post("/accounts/login/", {"username": name, "password": PASSWORD}).status_code == 302
