"""API tokens: one per user, renewed by a POST once expired, revoked by DELETE."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import PASSWORD, UserFactory


def issue(user) -> dict:
    response = APIClient().post("/api/auth/token/", {"username": user.username, "password": PASSWORD})
    assert response.status_code == 200, response.content
    return response.json()


def status_with(key: str) -> int:
    return APIClient().get("/api/analyses/", HTTP_AUTHORIZATION=f"Token {key}").status_code


def age(key: str, days: int) -> None:
    Token.objects.filter(key=key).update(created=timezone.now() - timedelta(days=days))


def test_a_token_is_issued_once_and_says_when_it_expires(settings, user):
    settings.API_TOKEN_DAYS = 30
    first, again = issue(user), issue(user)
    assert first["token"] == again["token"] and status_with(first["token"]) == 200
    expires = parse_datetime(first["expires_at"])
    assert abs(expires - (timezone.now() + timedelta(days=30))) < timedelta(minutes=1)


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


def test_a_period_of_zero_never_expires(settings, user):
    settings.API_TOKEN_DAYS = 0
    key = issue(user)["token"]
    age(key, 3650)
    assert status_with(key) == 200 and issue(user) == {"token": key, "expires_at": None}


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
    assert not Token.objects.filter(user=user).exists()


def test_the_account_page_issues_a_key_once_shows_its_expiry_and_revokes_it(client, settings, user, other_user):
    settings.API_TOKEN_DAYS = 30
    theirs = issue(other_user)["token"]
    client.force_login(user)
    assert "You have no API token." in client.get("/account/api-token/").content.decode()

    response = client.post("/account/api-token/", {"action": "issue"})
    assert "no-store" in response["Cache-Control"]
    page, key = response.content.decode(), Token.objects.get(user=user).key
    assert f'<code id="token-key">{key}</code>' in page and status_with(key) == 200

    later = client.get("/account/api-token/").content.decode()
    assert key not in later and f"…{key[-4:]}" in later  # the whole key is shown only once
    until = timezone.localtime(Token.objects.get(user=user).created + timedelta(days=30))
    assert f"It works until {until:%Y-%m-%d %H:%M}." in later

    replaced = client.post("/account/api-token/", {"action": "issue"}).content.decode()
    new = Token.objects.get(user=user).key
    assert new != key and new in replaced and status_with(key) == 401 and status_with(new) == 200

    age(new, 31)
    assert "It has expired" in client.get("/account/api-token/").content.decode()
    revoked = client.post("/account/api-token/", {"action": "revoke"}, follow=True).content.decode()
    assert "API token revoked" in revoked and "You have no API token." in revoked
    assert status_with(new) == 401 and status_with(theirs) == 200
