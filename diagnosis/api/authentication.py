"""API tokens that expire: a key copied into a lab system's configuration should not work forever."""

from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from diagnosis.tokens import token_expired


class ExpiringTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key):
        user, token = super().authenticate_credentials(key)
        if token_expired(token):
            raise AuthenticationFailed(
                "This token has expired. POST your username and password to /api/auth/token/ for a new one."
            )
        return user, token
