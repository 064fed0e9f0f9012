"""API tokens: one per user, working for API_TOKEN_DAYS after it was issued (0: forever).

The API's token endpoint and the account page both go through here, so they agree on when a
token has expired and on what issuing or revoking one does.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone
from rest_framework.authtoken.models import Token


def expires_at(token: Token) -> datetime | None:
    days = settings.API_TOKEN_DAYS
    return token.created + timedelta(days=days) if days > 0 else None


def token_expired(token: Token) -> bool:
    end = expires_at(token)
    return end is not None and end <= timezone.now()


def current_token(*, user: AbstractBaseUser) -> Token | None:
    return Token.objects.filter(user=user).first()


def working_token(*, user: AbstractBaseUser) -> Token:
    """The user's token, or a new one if there is none or it has expired (the API's POST)."""
    token, _ = Token.objects.get_or_create(user=user)
    return new_token(user=user) if token_expired(token) else token


def new_token(*, user: AbstractBaseUser) -> Token:
    """Replace the user's token: the old key stops working at once."""
    revoke_token(user=user)
    return Token.objects.create(user=user)


def revoke_token(*, user: AbstractBaseUser) -> None:
    Token.objects.filter(user=user).delete()
