"""Test settings: the environment-driven project settings, with test traffic kept apart from a
platform that may be running on the same machine (its own queue and filesystem-broker folder)."""

import os
from pathlib import Path

# Queues of their own (the analyses' and the housekeeping one the project settings derive from it);
# the session worker is started with queues of its own (tests.conftest.SESSION_WORKER_QUEUE).
os.environ["CELERY_QUEUE"] = os.environ.get("TEST_CELERY_QUEUE") or "tests"

from malaria_site.cache import redis_cache  # noqa: E402
from malaria_site.settings import *  # noqa: E402, F403
from malaria_site.settings import CELERY_BROKER_URL, VAR_DIR  # noqa: E402

# The filesystem broker's folder: named by the first process (pytest's) and inherited by the workers
# it starts, whose VAR_DIR is a folder of their own (tests.conftest.WorkerProcess).
_broker_dir = Path(os.environ.setdefault("TEST_BROKER_DIR", str(VAR_DIR / "test-broker")))
if CELERY_BROKER_URL.startswith("filesystem://"):
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "control_folder": str(_broker_dir / "control"),
    }
# Pages render without a collectstatic manifest, whatever DJANGO_DEBUG a local .env sets.
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
# Password hashing is deliberately slow; tests log in many times.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Rate-limit counters must not carry over between test runs through a shared Redis; a test of a
# Redis outage gives its own server a Redis cache (TEST_REDIS_CACHE_URL), as REDIS_URL gives one.
if _own_redis := os.environ.get("TEST_REDIS_CACHE_URL"):
    CACHES = {"default": redis_cache(_own_redis)}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# Batch callbacks go to a receiver the tests run on this machine.
CALLBACK_ALLOWED_HOSTS = ["127.0.0.1"]
CALLBACK_SECRET = "key-shared-with-the-test-receiver"
CALLBACK_ALLOW_HTTP = True  # the receiver has no TLS certificate
