"""DRF's rate limits, keyed by a keyed digest of the client's address rather than the address itself.

The counters live in Redis, whose append-only file keeps every key written: a trail of who called
from where that no retention period reaches. A digest keyed with SECRET_KEY counts the same, and
cannot be reversed by trying the addresses of a hospital's network one by one.
"""

from django.utils.crypto import salted_hmac
from rest_framework import throttling

from diagnosis.login_throttle import client_address, counted_source


class AddressDigestMixin:
    def get_ident(self, request) -> str:
        # The address the sign-in lockout and the access trail take (CLIENT_IP_HEADER behind the
        # proxy), not DRF's X-Forwarded-For, which a client reaching gunicorn can make up afresh
        # on every request. An IPv6 client's /64 counts as one, as for the sign-in lockout.
        return salted_hmac("diagnosis.api.throttling", counted_source(client_address(request))).hexdigest()[:32]


class AnonRateThrottle(AddressDigestMixin, throttling.AnonRateThrottle):
    pass


class UserRateThrottle(AddressDigestMixin, throttling.UserRateThrottle):
    """Keyed by user id once signed in; by the address (as a digest) for a request that is not."""


class ScopedRateThrottle(AddressDigestMixin, throttling.ScopedRateThrottle):
    pass
