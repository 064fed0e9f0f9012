"""The shared Redis cache, falling back to this process's memory while Redis fails.

It holds counters only: the sign-in lockout's and the API's rate limits. When Redis is down or
stalls, an error from it would refuse every sign-in and every API request (500), uploads included,
though the broker's outage is already survived (the sweeper sends queued cells later). So after a
Redis error the counting goes on in this process's memory for ``RETRY_AFTER_SECONDS`` (logged),
then Redis is asked again: a stalled Redis costs one socket timeout per process that often, not one
per lookup, and the limits still hold meanwhile, per process rather than across them.
"""

import logging
import time

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache
from redis.exceptions import RedisError

logger = logging.getLogger("malaria_site.cache")

RETRY_AFTER_SECONDS = 5
# Each lookup waits at most this long for Redis: a sign-in makes several.
SOCKET_TIMEOUT_SECONDS = 1


class FallbackRedisCache(RedisCache):
    unreachable_until = 0.0  # per process: every thread's instance shares it
    # Room for the counters of a busy site's worth of clients while Redis is away (the default 300
    # would start evicting them).
    in_memory = LocMemCache("malaria_site.cache.fallback", {"OPTIONS": {"MAX_ENTRIES": 100_000}})

    def _either(self, operation: str, *args, **kwargs):
        if time.monotonic() >= FallbackRedisCache.unreachable_until:
            try:
                return getattr(super(), operation)(*args, **kwargs)
            except RedisError as error:
                FallbackRedisCache.unreachable_until = time.monotonic() + RETRY_AFTER_SECONDS
                logger.warning(
                    "event=cache_unavailable retry_after_seconds=%s error=%r: sign-in failures and API "
                    "rate limits are counted in this process only meanwhile",
                    RETRY_AFTER_SECONDS,
                    error,
                )
        return getattr(FallbackRedisCache.in_memory, operation)(*args, **kwargs)

    def get(self, key, default=None, version=None):
        return self._either("get", key, default, version)

    def get_many(self, keys, version=None):
        return self._either("get_many", keys, version)

    def has_key(self, key, version=None):
        return self._either("has_key", key, version)

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        return self._either("add", key, value, timeout, version)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        return self._either("set", key, value, timeout, version)

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        return self._either("set_many", data, timeout, version)

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        return self._either("touch", key, timeout, version)

    def incr(self, key, delta=1, version=None):
        return self._either("incr", key, delta, version)

    def decr(self, key, delta=1, version=None):
        return self._either("decr", key, delta, version)

    # A deletion (a sign-in clearing its failures) reaches the memory too: a count kept there
    # during an earlier error must not come back at the next one.
    def delete(self, key, version=None):
        FallbackRedisCache.in_memory.delete(key, version)
        return self._either("delete", key, version)

    def delete_many(self, keys, version=None):
        FallbackRedisCache.in_memory.delete_many(keys, version)
        return self._either("delete_many", keys, version)

    def clear(self):
        FallbackRedisCache.in_memory.clear()
        return self._either("clear")


def redis_cache(url: str) -> dict:
    """The CACHES entry for a Redis at ``url``."""
    return {
        "BACKEND": "malaria_site.cache.FallbackRedisCache",
        "LOCATION": url,
        "OPTIONS": {"socket_connect_timeout": SOCKET_TIMEOUT_SECONDS, "socket_timeout": SOCKET_TIMEOUT_SECONDS},
    }
