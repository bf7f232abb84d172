"""SPEC 2.3 and 6: log formats, levels, rotation, and masking."""

import io
import json
import logging
import re
import time

import pytest

from relay_lib import logs
from relay_lib.logs import fields, log, mask_url, session_logger, setup_logging


@pytest.fixture
def logfile(tmp_path):
    """A log file for setup_logging; the logger is put back as it was after."""
    path = tmp_path / "relay.log"
    level, propagate = log.level, log.propagate
    yield path
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(level)
    log.propagate = propagate


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)"


def test_2_3_default_format(logfile):
    """The Go program's console shape: RFC 3339 time to the millisecond, LVL, message, key=value."""
    setup_logging(str(logfile), "default", "info")
    log.info("delivered", extra=fields(id="abc", to=["x@example.com", "y@example.com"], note="two words"))
    (line,) = lines(logfile)
    assert re.fullmatch(STAMP + r' INF delivered id=abc to=x@example.com,y@example.com note="two words"',
                        line), line


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="time.tzset is POSIX only")
def test_2_3_utc_time_is_written_with_z(logfile, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(logs, "_last_stamp", (-1, "", ""))
    try:
        assert logs._rfc3339(1764606738.1234) == "2025-12-01T16:32:18.123Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_2_3_plain_format_has_no_time(logfile):
    setup_logging(str(logfile), "plain", "info")
    log.warning("refused", extra=fields(reason="nets"))
    assert lines(logfile) == ["WRN refused reason=nets"]


def test_2_3_pretty_format_is_coloured_only_on_a_terminal(logfile):
    setup_logging(str(logfile), "pretty", "info")
    log.error("failed", extra=fields(reason="x"))
    (line,) = lines(logfile)
    assert re.fullmatch(STAMP + " ERR failed reason=x", line), line  # a file is no terminal

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    handler = logging.StreamHandler(Terminal())
    handler.setFormatter(logs.make_formatter("pretty", handler.stream))
    log.addHandler(handler)
    log.warning("refused", extra=fields(reason="nets"))
    coloured = handler.stream.getvalue()
    assert "\x1b[31mWRN\x1b[0m refused \x1b[36mreason=\x1b[0mnets" in coloured


def test_2_3_json_format(logfile):
    """zerolog's key names: level, time, message; lists stay lists."""
    setup_logging(str(logfile), "json", "info")
    session_logger(peer="10.0.0.1").info("message", extra=fields(size=12, to=["a@x.test", "b@x.test"]))
    obj = json.loads(lines(logfile)[0])
    assert list(obj)[:3] == ["level", "time", "message"]
    assert obj["level"] == "info" and obj["message"] == "message" and re.fullmatch(STAMP, obj["time"])
    assert obj["peer"] == "10.0.0.1" and obj["size"] == 12 and obj["to"] == ["a@x.test", "b@x.test"]


@pytest.mark.parametrize("level,shown", [("error", ["ERR"]), ("warn", ["ERR", "WRN"]),
                                         ("warning", ["ERR", "WRN"]),
                                         ("info", ["ERR", "WRN", "INF"]),
                                         ("trace", ["ERR", "WRN", "INF", "DBG", "TRC"]),
                                         ("disabled", [])])
def test_2_3_levels(logfile, level, shown):
    setup_logging(str(logfile), "plain", level)
    log.critical("f")
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    log.log(logs.TRACE, "t")
    assert [l.split()[0] for l in lines(logfile)] == (["FTL"] + shown if shown else [])


def test_6_session_context_tags_every_line_of_the_thread(logfile):
    setup_logging(str(logfile), "plain", "info")
    with logs.session_context(session="5e55", port=40001):
        log.info("message", extra=fields(id="m1"))
    log.info("listening on")
    assert lines(logfile) == ["INF message session=5e55 port=40001 id=m1", "INF listening on"]


def test_2_3_logfile_rotates(logfile, monkeypatch):
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    setup_logging(str(logfile), "plain", "info")
    for n in range(200):
        log.info("line", extra=fields(n=n, pad="x" * 40))
    rotated = sorted(p.name for p in logfile.parent.iterdir())
    assert rotated == ["relay.log", "relay.log.1", "relay.log.2", "relay.log.3"]


def test_2_3_rotation_blocked_keeps_logging(logfile, monkeypatch):
    """A rotated name held open elsewhere (Windows) must not lose lines."""
    monkeypatch.setattr(logs, "ROTATE_BYTES", 500)
    setup_logging(str(logfile), "plain", "info")

    def locked(source, dest):
        raise PermissionError(13, "file is in use")

    log.handlers[0].rotator = locked
    for n in range(50):
        log.info("line", extra=fields(n=n))
    assert [p.name for p in logfile.parent.iterdir()] == ["relay.log"]
    assert lines(logfile)[-1] == "INF line n=49"
    assert len(lines(logfile)) == 50


@pytest.mark.parametrize("fmt", ["default", "json"])
def test_6_bytes_that_are_not_utf8_are_logged_escaped(logfile, fmt, capsys):
    """A hostile client's user name decoded with surrogateescape must not lose the line."""
    setup_logging(str(logfile), fmt, "info")
    log.warning("authentication failed", extra=fields(user=b"bad\xff".decode("utf-8", "surrogateescape")))
    (line,) = lines(logfile)
    assert "authentication failed" in line and "bad" in line
    assert "Logging error" not in capsys.readouterr().err


def test_6_session_logger_binds_fields(logfile):
    setup_logging(str(logfile), "plain", "debug")
    slog = session_logger(peer="192.0.2.1")
    slog.bind(session="s1")
    slog.debug("EHLO", extra=fields(helo="printer"))
    assert lines(logfile) == ["DBG EHLO peer=192.0.2.1 session=s1 helo=printer"]


@pytest.mark.parametrize("url,masked", [
    ("smtp://user:Secr3t@mail.example.com:25", "smtp://user:***@mail.example.com:25"),
    ("see https://a:b%40c@scanner/x and tls://u:v@h", "see https://a:***@scanner/x and tls://u:***@h"),
    ("smtp://user@host", "smtp://user@host"),
    ("http://scanner.example/scan", "http://scanner.example/scan"),
])
def test_5_1_mask_url(url, masked):
    assert mask_url(url) == masked
