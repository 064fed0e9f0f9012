"""gunicorn settings for the web service; GUNICORN_WORKERS and GUNICORN_TIMEOUT come from .env."""

import logging
import os
import re
from pathlib import Path

import environ

# Under compose .env arrives as the environment; outside Docker it is read here, as settings.py
# reads it (gunicorn reads this file before Django starts), the environment still winning.
environ.Env.read_env(Path(__file__).resolve().parent.parent / ".env", overwrite=False)

# This machine only, trusting X-Forwarded-* from a proxy on it (gunicorn's default, or the addresses
# in FORWARDED_ALLOW_IPS): reachable from elsewhere, gunicorn would take any client's word for its
# address and scheme. Under compose the web service's command widens both, on a network only
# nginx shares.
bind = "127.0.0.1:8000"
# Empty values (a blank line in .env) fall back to the defaults.
workers = int(os.environ.get("GUNICORN_WORKERS") or 3)
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 60)
# On a stop (a redeploy) a request under way may take as long as it may take at any other time;
# the web service's stop_grace_period (WEB_STOP_GRACE) is longer still.
graceful_timeout = timeout
# Recycle workers now and then so a slow leak cannot grow without bound.
max_requests = 1000
max_requests_jitter = 100
# The heartbeat file lives in memory: a container's overlay filesystem can stall it.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# Logs go to the container's stdout/stderr. nginx is the only client; X-Real-IP is the visitor's address.
accesslog = "-"
errorlog = "-"
# The path without its query string: queries can carry patient references (?search=...).
access_log_format = '%({x-real-ip}i)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms "%(a)s"'


class _WithoutQueries(logging.Filter):
    """gunicorn's error log quotes a request line it refuses whole (one sent with a raw "José" in
    its ?sample_reference=, say): queries are left out there too."""

    # From a "?" inside a word to the request line's protocol: a query may hold quotes ("D'Almeida")
    # and raw spaces; a "?" ending a sentence is left alone.
    QUERY = re.compile(r"(?<=\S)\?\S+(?:\s+(?!HTTP/)\S+)*")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.QUERY.sub("?(query left out)", record.getMessage()), ()
        return True


WITHOUT_QUERIES = _WithoutQueries()


def on_starting(server):
    server.log.error_log.addFilter(WITHOUT_QUERIES)


def post_worker_init(worker):  # the workers, which refuse the requests, log them
    worker.log.error_log.addFilter(WITHOUT_QUERIES)
