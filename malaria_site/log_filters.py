"""Logging filters that keep patient data out of the logs."""

import logging
import re

QUERY_STRING = re.compile(r"\?\S*")


class RequestLineWithoutQuery(logging.Filter):
    """The development server's request lines (scripts/start) without their query strings, which can
    carry patient references (?search=..., ?sample_reference=...), as gunicorn's and nginx's are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple) and isinstance(record.args[0], str):
            record.args = (QUERY_STRING.sub("", record.args[0], count=1), *record.args[1:])
        return True
