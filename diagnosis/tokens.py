"""API tokens: one per user, working for API_TOKEN_DAYS after it was issued (0: forever).

Only a digest of each key is stored, so a key can be shown once, when it is issued, and never
again. The API's token endpoint, the account page and the authentication class all go through
here, so they agree on how a key is found, when it has expired and what issuing or revoking does.
"""

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from diagnosis.models import ApiToken

# Recording every request's use would write to the database on every API call; this often is enough
# for "last used" to tell a live key from a forgotten one.
USE_RECORDED_EVERY = timedelta(minutes=5)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def expires_at(token: ApiToken) -> datetime | None:
    days = settings.API_TOKEN_DAYS
    return token.created + timedelta(days=days) if days > 0 else None


def token_expired(token: ApiToken) -> bool:
    end = expires_at(token)
    return end is not None and end <= timezone.now()


def current_token(*, user: AbstractBaseUser) -> ApiToken | None:
    return ApiToken.objects.filter(user=user).first()


def token_for_key(*, key: str) -> ApiToken | None:
    return ApiToken.objects.select_related("user").filter(digest=digest(key)).first()


def new_token(*, user: AbstractBaseUser) -> tuple[ApiToken, str]:
    """Replace the user's token: the old key stops working at once. Returns the token and its key."""
    key = secrets.token_hex(20)
    # One row per user, rewritten in place: two requests at once (a double click) both succeed, the last wins.
    token, _ = ApiToken.objects.update_or_create(
        user=user,
        defaults={"digest": digest(key), "hint": key[-4:], "created": timezone.now(), "last_used_at": None},
    )
    return token, key


def revoke_token(*, user: AbstractBaseUser) -> None:
    ApiToken.objects.filter(user=user).delete()


def record_use(*, token: ApiToken) -> None:
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= USE_RECORDED_EVERY:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
