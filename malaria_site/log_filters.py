"""Logging filters that keep patient data out of the logs, and noise out of their errors."""

import logging
import re

# From the "?" to the protocol (a query sent with a raw space in it runs on to there), or to the end.
QUERY_STRING = re.compile(r"\?.*?(?= HTTP/\d|$)")


class RequestLineWithoutQuery(logging.Filter):
    """The development server's request lines (scripts/start) without their query strings, which can
    carry patient references (?search=..., ?sample_reference=...), as gunicorn's and nginx's are;
    its "Bad request syntax ('...')" errors quote the line too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(QUERY_STRING.sub("", arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


class AsWarningWithoutTraceback(logging.Filter):
    """Django logs each request for a host not in ALLOWED_HOSTS as an ERROR with its traceback:
    every scanner that asks for the server's address filled the log, and the alerts kept on its
    errors, with them. The request is refused (400) all the same; the log says so in a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True
