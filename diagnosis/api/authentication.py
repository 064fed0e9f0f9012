"""API tokens that expire: a key copied into a lab system's configuration should not work forever."""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed


def expires_at(token) -> datetime | None:
    """When the token stops working: API_TOKEN_DAYS after it was issued; never for zero or less."""
    days = settings.API_TOKEN_DAYS
    return token.created + timedelta(days=days) if days > 0 else None


def token_expired(token) -> bool:
    end = expires_at(token)
    return end is not None and end <= timezone.now()


class ExpiringTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key):
        user, token = super().authenticate_credentials(key)
        if token_expired(token):
            raise AuthenticationFailed(
                "This token has expired. POST your username and password to /api/auth/token/ for a new one."
            )
        return user, token
