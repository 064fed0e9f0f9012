"""The shared Redis cache, falling back to this process's memory while Redis fails; without Redis,
files that count right.

It holds counters only: the sign-in lockout's and the API's rate limits. When Redis is down or
stalls, an error from it would refuse every sign-in and every API request (500), uploads included,
though the broker's outage is already survived (the sweeper sends queued cells later). So after a
Redis error the counting goes on in this process's memory for ``RETRY_AFTER_SECONDS`` (logged),
then Redis is asked again: a stalled Redis costs one socket timeout per process that often, not one
per lookup, and the limits still hold meanwhile, per process rather than across them.
"""

import contextlib
import fcntl
import logging
import os
import pickle
import time
import zlib

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.filebased import FileBasedCache
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


class CountingFileCache(FileBasedCache):
    """Django's file cache, with counts that hold: its add and incr read and then write, so guesses
    sent at once (runserver serves each in a thread, gunicorn's workers are processes) each found
    the count under the limit, and its incr wrote the count back with the default timeout, cutting
    a lockout short. Here both run one at a time, across processes, and a count keeps its expiry."""

    @contextlib.contextmanager
    def _one_at_a_time(self):
        self._createdir()
        with open(os.path.join(self._dir, "counting.lock"), "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
            yield

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        with self._one_at_a_time():
            return super().add(key, value, timeout, version)

    def incr(self, key, delta=1, version=None):  # decr too, which calls it
        with self._one_at_a_time():
            try:
                with open(self._key_to_file(key, version), "rb") as entry:  # as FileBasedCache writes it
                    expiry = pickle.load(entry)
                    value = pickle.loads(zlib.decompress(entry.read()))
            except (FileNotFoundError, EOFError):
                expiry, value = 0, None
            if value is None or (expiry is not None and expiry < time.time()):
                raise ValueError(f"Key '{key}' not found")
            self.set(key, value + delta, None if expiry is None else max(expiry - time.time(), 0.001), version)
            return value + delta


def file_cache(folder: str) -> dict:
    """The CACHES entry for counts kept in ``folder``."""
    # Room for the counts of many clients: past it, a third of the entries (a locked-out account's
    # count among them) would be dropped at random. Each write lists the folder, so not 100,000.
    return {"BACKEND": "malaria_site.cache.CountingFileCache", "LOCATION": folder, "OPTIONS": {"MAX_ENTRIES": 5000}}
