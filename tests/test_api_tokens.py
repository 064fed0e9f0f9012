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
