"""SPEC 3.2 hostile-client limits and SPEC 3.3 DATA framing, end to end:
SMTP smuggling, overlong lines, the error budget, HTTP on the SMTP port,
timeouts, and bytes that are not text."""

import time

import pytest

from conftest import outbox_messages
from smtp_talk import Talk


def start_data(t):
    assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
    assert t.cmd("RCPT TO:<b@example.com>") == "250 2.1.5 OK"
    assert t.cmd("DATA").startswith("354 ")


# -- 3.3 SMTP smuggling -----------------------------------------------------

SMUGGLED = b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSmuggled\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n"],
                         ids=["lf-dot-lf", "cr-dot-lf", "lf-dot-crlf", "crlf-dot-cr", "crlf-dot-lf"])
def test_3_3_smuggling_gives_one_message(relay, ready, fake_end):
    start_data(ready)
    ready.send(b"Subject: first\r\n\r\nbody" + fake_end + SMUGGLED + b"\r\n.\r\nQUIT\r\n")
    assert ready.reply().startswith("250 2.0.0 OK ")
    assert ready.reply() == "221 2.0.0 Bye"
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["to"] == ["b@example.com"]
    assert b"Smuggled" in message
    # Forwarded with CRLF line ends only, so the next server cannot be fooled.
    assert message.count(b"\n") == message.count(b"\r\n")
    assert message.count(b"\r") == message.count(b"\r\n")


def test_3_3_dot_unstuffing(relay, ready):
    start_data(ready)
    ready.send(b"Subject: dots\r\n\r\n..one\r\n...two\r\n.\r\n")
    assert ready.reply().startswith("250 2.0.0 OK ")
    (_, message), = outbox_messages(relay.outbox)
    assert message.endswith(b"\r\n\r\n.one\r\n..two\r\n")


def test_3_3_empty_body(relay, ready):
    start_data(ready)
    ready.send(b".\r\n")
    assert ready.reply().startswith("250 2.0.0 OK ")


def test_3_3_large_message(relay, ready):
    start_data(ready)
    body = b"".join(b"line %07d ..........................................\r\n" % i for i in range(20000))
    ready.send(body + b".\r\n")
    assert ready.reply().startswith("250 2.0.0 OK ")
    (_, message), = outbox_messages(relay.outbox)
    assert message.endswith(body)


# -- 3.2 line length ---------------------------------------------------------

def test_3_2_100kb_command_line_is_500(ready):
    ready.send(b"NOOP " + b"x" * 100 * 1024 + b"\r\n")
    assert ready.reply() == "500 5.5.2 Line too long"
    assert ready.cmd("NOOP") == "250 2.0.0 OK"


def test_3_2_4096_octet_line_is_accepted(ready):
    assert ready.cmd("NOOP " + "x" * 4091) == "250 2.0.0 OK"
    assert ready.cmd("NOOP " + "x" * 4092) == "500 5.5.2 Line too long"


def test_3_2_overlong_line_inside_a_pipeline(ready):
    ready.send(b"NOOP\r\n" + b"y" * 10000 + b"\r\nRSET\r\n")
    assert ready.replies(3) == ["250 2.0.0 OK", "500 5.5.2 Line too long", "250 2.0.0 OK"]


# -- 3.2 error budget ----------------------------------------------------------

def test_3_2_25_bad_commands(ready):
    ready.send(b"BOGUS\r\n" * 25)
    assert ready.replies(19) == ["500 5.5.2 Command unrecognized"] * 19
    assert ready.reply() == "421 4.7.0 Too many errors"
    assert ready.closed()


def test_3_2_error_budget_counts_every_failure(ready):
    for _ in range(9):
        assert ready.cmd("RCPT TO:<b@example.com>").startswith("503 5.5.1 ")
        assert ready.cmd("EHLO").startswith("501 5.5.4 ")
    assert ready.cmd("NOOP") == "250 2.0.0 OK"
    assert ready.cmd("VRFY").startswith("252 ")
    assert ready.cmd("BOGUS").startswith("500 5.5.2 ")
    assert ready.cmd("DATA") == "421 4.7.0 Too many errors"
    assert ready.closed()


# -- 3.2 HTTP on the SMTP port ----------------------------------------------

@pytest.mark.parametrize("verb", ["GET", "POST", "CONNECT", "HEAD", "PUT"])
def test_3_2_http_request_closes(relay, verb):
    with Talk(relay.port) as t:
        t.reply()
        t.send(b"%s / HTTP/1.1\r\nHost: relay\r\n\r\n" % verb.encode())
        assert t.closed()
        assert t.buf == b""  # no reply at all


# -- 3.2 timeouts -----------------------------------------------------------

def test_3_2_silent_client_is_timed_out(relay_factory):
    relay = relay_factory(read_timeout="1s")
    with Talk(relay.port) as t:
        started = time.monotonic()
        t.reply()
        assert t.reply() == "421 4.4.2 Timeout"
        assert t.closed()
        assert time.monotonic() - started < 3


def test_3_2_trickling_client_is_timed_out(relay_factory):
    relay = relay_factory(read_timeout="1s")
    with Talk(relay.port) as t:
        t.reply()
        started = time.monotonic()
        t.sock.settimeout(0.2)
        reply = b""
        for ch in b"NOOP and some more words":  # one byte every 0.2 s, never a line end
            t.send(bytes([ch]))
            try:
                reply = t.sock.recv(100)
                break
            except OSError:
                continue
        assert reply == b"421 4.4.2 Timeout\r\n"
        assert time.monotonic() - started < 2.5


# -- bytes that are not text ----------------------------------------------

@pytest.mark.parametrize("line", [b"\x00\x00\x00", b"\xff\xfe\xfd", b"EHLO \x00", b"MAIL FROM:<\x00@x>",
                                  b"\r", b"", b" ", b"NOOP\x00x"],
                         ids=["nuls", "invalid-utf8", "ehlo-nul", "mail-nul", "cr", "empty", "space",
                              "noop-nul"])
def test_3_2_odd_bytes_get_a_reply(ready, line):
    ready.send(line + b"\r\n")
    reply = ready.reply()
    assert reply[:3] in ("250", "500", "501")
    assert all(c >= " " for c in reply.replace("\n", ""))
    assert ready.cmd("NOOP") == "250 2.0.0 OK"


def test_3_2_ehlo_name_is_cleaned_when_echoed(relay, ready):
    ready.send(b"EHLO bad\x01\x1bname\r\n")
    assert ready.reply().startswith("250-relay.test")
