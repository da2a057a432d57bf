"""Chapter 10: the logs. One JSON object per line from every process,
Gunicorn's own lines included, each request's lines carrying its id; the
lines a person reads are one setting away (LOG_FORMAT=text).

No prometheus_client here: Gunicorn's master imports this module."""

import contextvars
import logging
import os
import re

# --8<-- [start:request_id]
# The id of the request being handled, for every line logged meanwhile:
# a contextvar follows each request's task, so ids never cross.
request_id = contextvars.ContextVar("request_id", default=None)
# What we take from X-Request-ID: anything else would let a client write
# what it likes into our logs. It is replaced, not refused: the header is
# a courtesy, and the request itself may be fine.
ACCEPTED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def id_for(incoming: str | None) -> str:
    """The load balancer's X-Request-ID if it set a sane one, else ours."""
    if incoming and ACCEPTED_ID.fullmatch(incoming):
        return incoming
    # 128 random bits, as a uuid4 has, at a tenth of uuid4()'s cost.
    return os.urandom(16).hex()


class RequestId(logging.Filter):
    """Puts the current request's id on each record logged during it."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        if current is not None:
            record.request_id = current
        return True


# --8<-- [end:request_id]


# --8<-- [start:config]
LOG_FORMAT = os.environ.get("LOG_FORMAT", "json")
LOG_FORMATS = ("json", "text")
# json: level, logger, message and pid named the way log stores expect.
JSON_FIELDS = {
    "()": "pythonjsonlogger.json.JsonFormatter",
    "fmt": "{levelname}{name}{message}{process}",
    "style": "{",
    "rename_fields": {
        "levelname": "level",
        "name": "logger",
        "process": "pid",
    },
    "timestamp": "time",
}
# text: Gunicorn's own layout, with the request id where there is one.
TEXT_FIELDS = {
    "format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
    "%(request_id)s",
    "datefmt": "%Y-%m-%d %H:%M:%S %z",
}


class TextRequestId(RequestId):
    """The text layout's request id: a suffix, and nothing outside one."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        record.request_id = f" [{current}]" if current else ""
        return True


def config(fmt: str = LOG_FORMAT) -> dict:
    """A dictConfig for Gunicorn's logconfig_dict and for `python app.py`.

    Gunicorn merges it into its defaults one level deep only: its own two
    loggers must be declared here, or their lines stay plain text."""
    if fmt not in LOG_FORMATS:
        raise ValueError(
            f"LOG_FORMAT={fmt!r}: use one of {', '.join(LOG_FORMATS)}"
        )
    stream = {
        "class": "logging.StreamHandler",
        "formatter": "line",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    quiet = {"level": "INFO", "handlers": ["stderr"], "propagate": False}
    filter_class = RequestId if fmt == "json" else TextRequestId
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": filter_class}},
        "formatters": {"line": JSON_FIELDS if fmt == "json" else TEXT_FIELDS},
        "handlers": {"stderr": stream},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {"gunicorn.error": quiet, "gunicorn.access": quiet},
    }


# --8<-- [end:config]
