"""The shared Redis cache, failing open.

It holds counters only: the sign-in lockout's and the API's rate limits. When Redis is down or
stalls, an error from it would refuse every sign-in and every API request (500), uploads included,
though the broker's outage is already survived (the sweeper sends queued cells later). So a Redis
error answers as an empty cache: for a while nothing is counted, and every request goes on, logged.
After an error the cache is not asked again for ``RETRY_AFTER_SECONDS``, so a stalled Redis costs
one socket timeout per process then, not one per lookup.
"""

import logging
import time

from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

logger = logging.getLogger("malaria_site.cache")

RETRY_AFTER_SECONDS = 30
# Each lookup waits at most this long for Redis: a sign-in makes several.
SOCKET_TIMEOUT_SECONDS = 1


class FailOpenRedisCache(RedisCache):
    unreachable_until = 0.0  # per process: every thread's instance shares it

    def _or_default(self, default, operation, *args, **kwargs):
        if time.monotonic() < FailOpenRedisCache.unreachable_until:
            return default
        try:
            return operation(*args, **kwargs)
        except RedisError as error:
            FailOpenRedisCache.unreachable_until = time.monotonic() + RETRY_AFTER_SECONDS
            logger.warning(
                "event=cache_unavailable retry_after_seconds=%s error=%r: sign-in failures and API rate "
                "limits are not counted meanwhile",
                RETRY_AFTER_SECONDS,
                error,
            )
            return default

    def get(self, key, default=None, version=None):
        return self._or_default(default, super().get, key, default, version)

    def get_many(self, keys, version=None):
        return self._or_default({}, super().get_many, keys, version)

    def add(self, key, value, timeout=None, version=None):
        return self._or_default(False, super().add, key, value, timeout, version)

    def set(self, key, value, timeout=None, version=None):
        return self._or_default(None, super().set, key, value, timeout, version)

    def incr(self, key, delta=1, version=None):
        return self._or_default(delta, super().incr, key, delta, version)

    def delete(self, key, version=None):
        return self._or_default(False, super().delete, key, version)


def redis_cache(url: str) -> dict:
    """The CACHES entry for a Redis at ``url``."""
    return {
        "BACKEND": "malaria_site.cache.FailOpenRedisCache",
        "LOCATION": url,
        "OPTIONS": {"socket_connect_timeout": SOCKET_TIMEOUT_SECONDS, "socket_timeout": SOCKET_TIMEOUT_SECONDS},
    }
