"""Logging: the three formats and levels of SPEC 2.3, rotation, and masking.

Owns how an event becomes a line. Callers log a short constant message plus
key=value fields; secrets are kept out by `mask_url` and by never passing them.
"""

import json
import logging
import logging.handlers
import re
import sys
from datetime import datetime
from typing import Optional

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
FORMATS = ("default", "plain", "json")
ROTATE_BYTES = 10 * 1024 * 1024  # SPEC 2.3
ROTATE_KEEP = 3

log = logging.getLogger("smtprelay")

_LEVEL_NAMES = {logging.CRITICAL: "fatal", logging.ERROR: "error", logging.WARNING: "warn",
                logging.INFO: "info", logging.DEBUG: "debug", TRACE: "trace"}


def fields(**kw) -> dict:
    """Wrap key=value fields for the `extra` argument of a log call."""
    return {"fields": kw}


class SessionLogger(logging.LoggerAdapter):
    """Binds fields (peer, session id) to every line a session logs."""

    def process(self, msg, kwargs):
        extra = kwargs.get("extra") or {}
        merged = dict(self.extra)
        merged.update(extra.get("fields", {}))
        kwargs["extra"] = {"fields": merged}
        return msg, kwargs

    def bind(self, **kw) -> None:
        self.extra = dict(self.extra, **kw)


def session_logger(**bound) -> SessionLogger:
    return SessionLogger(log, bound)


_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")


def mask_url(url: str) -> str:
    """Replace the password of any URL in the text with `***`."""
    return _URL_PASSWORD.sub(r"\1***@", url)


_last_stamp = (-1, "")  # (whole second, its RFC 3339 text): one format per second, not per line


def _rfc3339(created: float) -> str:
    global _last_stamp
    second = int(created)
    cached = _last_stamp
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds"))
        _last_stamp = cached  # one tuple assignment: safe to race between threads
    return cached[1]


_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _value(v) -> str:
    s = str(v)
    if not s or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


class KeyValueFormatter(logging.Formatter):
    """`default` and `plain`: [time] level message key=value..."""

    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            parts.append(_rfc3339(record.created))
        parts.append(_LEVEL_NAMES.get(record.levelno, record.levelname.lower()))
        parts.append(record.getMessage())
        for key, value in getattr(record, "fields", {}).items():
            parts.append("%s=%s" % (key, _value(value)))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """`json`: one object a line with time, level, msg and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": _rfc3339(record.created),
               "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
               "msg": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            obj.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None else str(value))
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """Rotation that survives a log file held open by another program.

    On Windows a file open elsewhere (an editor, a log shipper) cannot be
    renamed; then keep appending to it rather than losing lines.
    """

    def doRollover(self) -> None:
        try:
            super().doRollover()
        except OSError:
            if self.stream is None:
                self.stream = self._open()


def setup_logging(path: Optional[str], fmt: str, level: str) -> None:
    """Send the relay's log to `path` (rotated) or stderr, in format `fmt`."""
    if path:
        # backslashreplace: bytes a client sent that are not UTF-8 (a user
        # name, say) are written escaped instead of losing the line.
        handler = _RotatingFile(path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8",
                                errors="backslashreplace")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter(fmt == "default"))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(LEVELS[level])
    log.propagate = False
