"""gunicorn settings for the web service (read from the environment)."""

import os

bind = "0.0.0.0:8000"
workers = int(os.environ.get("GUNICORN_WORKERS", "3"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
accesslog = "-"
errorlog = "-"
# Uploads are buffered to disk by Django; nginx already limits the body size.
forwarded_allow_ips = "*"
