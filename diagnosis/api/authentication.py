"""API tokens that are stored hashed and expire: a key copied into a lab system's configuration
should not work forever, and a copy of the database should not hold working keys."""

from rest_framework.authentication import TokenAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from diagnosis import tokens


class ExpiringTokenAuthentication(TokenAuthentication):
    def authenticate(self, request):
        # The usual OAuth form: left to DRF, it is answered "credentials were not provided".
        if get_authorization_header(request).split(b" ", 1)[0].lower() == b"bearer":
            raise AuthenticationFailed("This API takes its key as 'Authorization: Token <key>', not 'Bearer <key>'.")
        return super().authenticate(request)

    def authenticate_credentials(self, key):
        token = tokens.token_for_key(key=key)
        if token is None:
            raise AuthenticationFailed("Invalid token.")
        if not token.user.is_active:
            token.delete()  # a deactivated account's key ends, however it was deactivated
            raise AuthenticationFailed("User inactive or deleted.")
        if tokens.token_expired(token):
            raise AuthenticationFailed(
                "This token has expired. POST your username and password to /api/auth/token/ for a new one."
            )
        tokens.record_use(token=token)
        return token.user, token
