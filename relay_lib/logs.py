"""Logging: the formats and levels of SPEC 2.3, rotation, masking, and the
session context every line of a session carries.

Owns how an event becomes a line, in the shapes of the Go smtprelay (zerolog):
`<time> <LVL> <message> key=value...`, or JSON with `level`, `time`,
`message`. Callers log a short constant message plus key=value fields;
secrets are kept out by `mask_url` and by never passing them.
"""

import contextlib
import contextvars
import json
import logging
import logging.handlers
import re
import sys
import time
from typing import Optional

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
DISABLED = logging.CRITICAL + 10  # above every level the relay logs at

LEVELS = {
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,  # zerolog's parser takes both spellings
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
    "disabled": DISABLED,
}
FORMATS = ("default", "plain", "pretty", "json")
ROTATE_BYTES = 10 * 1024 * 1024  # SPEC 2.3
ROTATE_KEEP = 3

log = logging.getLogger("smtprelay")

# (three-letter console label, JSON name) per level, as zerolog writes them.
_LEVEL_LABELS = {logging.CRITICAL: ("FTL", "fatal"), logging.ERROR: ("ERR", "error"),
                 logging.WARNING: ("WRN", "warn"), logging.INFO: ("INF", "info"),
                 logging.DEBUG: ("DBG", "debug"), TRACE: ("TRC", "trace")}
# ANSI colours of the `pretty` format on a terminal, as zerolog's console writer.
_LEVEL_COLOURS = {"TRC": "35", "DBG": "33", "INF": "32", "WRN": "31", "ERR": "1;31", "FTL": "1;31"}
_DIM, _KEY, _RESET = "\x1b[90m", "\x1b[36m", "\x1b[0m"


def _labels(record: logging.LogRecord):
    return _LEVEL_LABELS.get(record.levelno) or (record.levelname[:3].upper(), record.levelname.lower())


def fields(**kw) -> dict:
    """Wrap key=value fields for the `extra` argument of a log call."""
    return {"fields": kw}


# Fields of the session the current thread serves (its id and client port):
# added to every record logged in that thread, whichever module logs it.
_context: contextvars.ContextVar = contextvars.ContextVar("smtprelay_session", default=None)


@contextlib.contextmanager
def session_context(**kw):
    """Within the block, every line logged by this thread carries these fields."""
    token = _context.set(kw)
    try:
        yield
    finally:
        _context.reset(token)


def rebind_session(**kw) -> None:
    """Change fields of the current session context (a PROXY header names the client's port)."""
    bound = _context.get()
    if bound is not None:
        bound.update(kw)


class _SessionFields(logging.Filter):
    """Puts the session context first in each record's fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get()
        if bound:
            record.fields = dict(bound, **getattr(record, "fields", {}))
        return True


log.addFilter(_SessionFields())


class SessionLogger(logging.LoggerAdapter):
    """Binds fields (peer, user, message id) to every line a session logs."""

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


_last_stamp = (-1, "", "")  # (whole second, its date-time text, its UTC offset): formatted once a second


def _rfc3339(created: float) -> str:
    """RFC 3339 local time with milliseconds, `Z` for UTC, as Go writes it."""
    global _last_stamp
    second = int(created)
    cached = _last_stamp
    if cached[0] != second:
        local = time.localtime(second)
        offset = local.tm_gmtoff
        zone = "Z" if offset == 0 else "%s%02d:%02d" % ("-" if offset < 0 else "+",
                                                        abs(offset) // 3600, abs(offset) % 3600 // 60)
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", local), zone)
        _last_stamp = cached  # one tuple assignment: safe to race between threads
    return "%s.%03d%s" % (cached[1], int((created - second) * 1000), cached[2])


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        v = ",".join(str(item) for item in v)
    s = str(v)
    if not s or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


class KeyValueFormatter(logging.Formatter):
    """`default`, `plain` and `pretty`: [time] LVL message key=value...

    `colour` adds zerolog's console colours (only ever on a terminal).
    """

    def __init__(self, with_time: bool, colour: bool = False):
        super().__init__()
        self.with_time = with_time
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        label = _labels(record)[0]
        parts = []
        if self.colour:
            if self.with_time:
                parts.append(_DIM + _rfc3339(record.created) + _RESET)
            parts.append("\x1b[%sm%s%s" % (_LEVEL_COLOURS.get(label, "0"), label, _RESET))
            parts.append(record.getMessage())
            parts.extend("%s%s=%s%s" % (_KEY, key, _RESET, _value(value))
                         for key, value in getattr(record, "fields", {}).items())
        else:
            if self.with_time:
                parts.append(_rfc3339(record.created))
            parts.append(label)
            parts.append(record.getMessage())
            parts.extend("%s=%s" % (key, _value(value))
                         for key, value in getattr(record, "fields", {}).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _json_value(value):
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """`json`: one object a line with level, time, message and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"level": _labels(record)[1], "time": _rfc3339(record.created),
               "message": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            obj.setdefault(key, _json_value(value))
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


def make_formatter(fmt: str, stream) -> logging.Formatter:
    """The formatter of log_format `fmt`; `pretty` is coloured only on a terminal."""
    if fmt == "json":
        return JsonFormatter()
    colour = fmt == "pretty" and hasattr(stream, "isatty") and stream.isatty()
    return KeyValueFormatter(with_time=fmt != "plain", colour=colour)


def setup_logging(path: Optional[str], fmt: str, level: str) -> None:
    """Send the relay's log to `path` (rotated) or stderr, in format `fmt`."""
    handler: logging.StreamHandler
    if path:
        # backslashreplace: bytes a client sent that are not UTF-8 (a user
        # name, say) are written escaped instead of losing the line.
        handler = _RotatingFile(path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8",
                                errors="backslashreplace")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, handler.stream))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(LEVELS[level])
    log.propagate = False
