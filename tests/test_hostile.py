"""SPEC 3.2, 7 and 12 under attack: hostile clients of the metrics endpoint,
PROXY headers cut, stalled or followed at once by SMTP, AUTH with absurd
passwords, a token endpoint that trickles or answers nonsense, config files
with odd bytes, a regex Python's backtracking cannot match in time, and a
HELO full of escape sequences. Real sockets, real relays, real processes.

Each test also checks what the promise is about: a clear reply, the next
client served, no slot or thread left behind, nothing unbounded logged.
"""

import base64
import http.client
import http.server
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import tracemalloc

import pytest

from conftest import Trickle, outbox_messages, relay_command, wait_until, write_ini
from relay_lib import config, logs, metrics_http
from relay_lib.oauth import MAX_LIFETIME, TokenError, TokenSource
from smtp_talk import Talk, write_users
from test_metrics import get
from test_proxy import ALLOWED, CLIENT, tlv, v1, v2


# -- the metrics endpoint (SPEC 12) ---------------------------------------------

@pytest.fixture
def metrics_relay(relay_factory, monkeypatch):
    monkeypatch.setattr(metrics_http, "REQUEST_DEADLINE", 1.0)
    return relay_factory(metrics_listen="127.0.0.1:0")


def healthz_ok(address):
    try:
        return get(address, "/healthz")[:2] == (200, "ok\n")
    except (OSError, http.client.HTTPException):
        return False  # closed unanswered: every request slot is taken


class Loris:
    """A client that sends one byte of a request every `gap` seconds (never,
    with gap None) and notes when the server closes the connection."""

    REQUEST = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n" + b"X-Pad: " + b"x" * 200

    def __init__(self, address, gap):
        self.sock = socket.create_connection(address, timeout=5)
        self.gap = gap
        self.closed_at = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        self.sock.settimeout(self.gap or 0.05)
        sent = 0
        while not self._stop.is_set():
            try:
                if self.gap is not None and sent < len(self.REQUEST):
                    self.sock.sendall(self.REQUEST[sent:sent + 1])
                    sent += 1
                if self.sock.recv(1024) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        self.closed_at = time.monotonic()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("gap", [None, 0.1], ids=["silent", "one-byte-at-a-time"])
def test_12_metrics_hostile_clients_deny_healthz_at_most_the_request_deadline(metrics_relay, gap):
    relay = metrics_relay
    address = relay.metrics_address
    started = time.monotonic()
    lorises = [Loris(address, gap) for _ in range(metrics_http.MAX_REQUESTS)]
    try:
        with Talk(relay.port) as t:  # the SMTP listener serves meanwhile
            assert t.reply().startswith("220 ")
            assert t.cmd("QUIT").startswith("221 ")
        assert wait_until(lambda: all(l.closed_at for l in lorises), 5)
        assert wait_until(lambda: healthz_ok(address), 5)
        # The request deadline (1 s here), not the per-read timeout (5 s),
        # is how long they held the slots; a trickle no longer holds them forever.
        assert max(l.closed_at for l in lorises) - started < 2.5
    finally:
        for loris in lorises:
            loris.stop()


def raw_answer(address, data):
    """What the endpoint answers `data` with, up to its close."""
    answer = b""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        for chunk in iter(lambda: sock.recv(65536), b""):
            answer += chunk
    return answer


@pytest.mark.parametrize("data, expected", [
    (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 501 "),
    (b"GET /metrics?x HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 200 "),
    (b"GET //metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 200 "),  # the same on every Python 3.9+
    (b"GET http://relay/healthz HTTP/1.1\r\n\r\n", b"HTTP/1.0 200 "),  # absolute form [R9112 3.2.2]
    (b"GET /healthz/ HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 404 "),
    (b"GET /" + b"a" * 65532, b"HTTP/1.0 414 "),  # 65537 octets: one past the request line limit
    (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 101, b"HTTP/1.0 431 "),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 65534, b"HTTP/1.0 431 "),
    (b"GET /" + b"a" * 65000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.0 404 "),
    # No HTTP version, so http.server answers as to HTTP/0.9: the error page alone.
    (b"\x16\x03\x01 \x00\xff\x1b[31m\x1b]0;pwned\x07 garbage\r\n", b"<p>Error code: 400</p>"),
], ids=["head", "query", "double-slash", "absolute-form", "trailing-slash", "huge-request-line", "101-headers",
        "huge-header", "long-path", "not-http"])
def test_12_metrics_hostile_requests_get_a_clear_status_and_a_bounded_log_line(metrics_relay, relay_log,
                                                                                 data, expected):
    address = metrics_relay.metrics_address
    answer = raw_answer(address, data)
    assert answer.startswith(expected) or expected.startswith(b"<") and expected in answer, answer[:300]
    assert healthz_ok(address)
    formatter = logs.make_formatter("default", None)
    for record in relay_log.records:
        line = formatter.format(record)
        assert "\x1b" not in line and "\x00" not in line and len(line) < 1000, line[:200]


# -- the OAuth token endpoint (SPEC 10) -------------------------------------------

class Answering:
    """A token endpoint on loopback that answers every POST with `body`, or
    with `size` octets of JSON-looking filler sent as fast as the client reads."""

    def __init__(self, body=b"", size=0):
        answering = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(answering.size or len(answering.body)))
                self.end_headers()
                try:
                    if answering.size:
                        chunk = b" " * 65536
                        for _ in range(answering.size // len(chunk)):
                            self.wfile.write(chunk)
                    else:
                        self.wfile.write(answering.body)
                except OSError:
                    pass  # the relay stopped reading, as it should

            def log_message(self, fmt, *args):
                pass

        self.body, self.size = body, size
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/token" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def answering():
    started = []

    def start(**kw):
        started.append(Answering(**kw))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.stop()


def source_for(url, timeout=2.0):
    return TokenSource(url, "client-id", "client-Secret-1", "scope", None, timeout=timeout)


def test_10_trickled_token_answer_is_cut_at_remote_timeout():
    trickle = Trickle(gap=0.1)  # 250 octets, one every 0.1 s: each read is quick, the whole is not
    try:
        started = time.monotonic()
        with pytest.raises(TokenError, match=r"^token endpoint timed out after 0\.5s$"):
            source_for(trickle.url, timeout=0.5).get()
        assert time.monotonic() - started < 1.5
    finally:
        trickle.stop()


def test_10_100_mb_token_answer_is_read_no_further_than_64_kb(answering):
    endpoint = answering(size=100 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(TokenError, match="not JSON"):
            source_for(endpoint.url).get()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


@pytest.mark.parametrize("expires_in, lifetime", [
    (b"-5", 1), (b"0", 1), (b'"3600"', 3600), (b'"soon"', 3600), (b"NaN", 3600),
    (b"Infinity", 3600), (b"1e999", 3600), (b"1" + b"0" * 400, MAX_LIFETIME), (b"[1]", 3600),
], ids=["negative", "zero", "string", "word", "nan", "infinity", "1e999", "huge", "list"])
def test_10_odd_expires_in_gives_a_bounded_lifetime(answering, expires_in, lifetime):
    endpoint = answering(body=b'{"access_token": "tok-123", "expires_in": %s}' % expires_in)
    token, fetched = source_for(endpoint.url).get()
    assert fetched and token.access_token == "tok-123" and token.expires_in == lifetime
    assert token.renew_at <= token.expires_at < time.monotonic() + MAX_LIFETIME + 1


@pytest.mark.parametrize("token", ["tok\r\nQUIT", "tok\x01auth=Bearer x", "tok en", "t\u00f6k", "tok\x1b[2J"],
                         ids=["crlf", "sasl-separator", "space", "non-ascii", "ansi"])
def test_10_access_token_with_control_characters_is_refused(answering, relay_log, token):
    endpoint = answering(body=json.dumps({"access_token": token, "expires_in": 3600}).encode())
    with pytest.raises(TokenError) as caught:
        source_for(endpoint.url).get()
    assert str(caught.value) == "token endpoint answered an access_token that is not printable ASCII"
    assert not any(token in repr(r.__dict__) for r in relay_log.records)


# -- the config surface (SPEC 2.1, 2.3, 7) --------------------------------------

def check_in(folder, dotenv: bytes):
    """`relay.py -check` run in `folder` with `dotenv` as its .env: (exit status, stdout, stderr)."""
    (folder / ".env").write_bytes(dotenv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPRELAY_") or k.startswith("SMTPRELAY_TEST_")}
    done = subprocess.run(relay_command() + ["-check"], cwd=str(folder), env=env, capture_output=True, timeout=30)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def test_2_1_dotenv_with_bom_and_crlf_is_read(tmp_path):
    status, out, err = check_in(tmp_path, b"\xef\xbb\xbfhostname=bom.test\r\nlisten=127.0.0.1:2599\r\n"
                                          b"remotes=file:outbox\r\n")
    assert status == 0, err
    assert "hostname = bom.test" in out.splitlines() and "listen = 127.0.0.1:2599" in out.splitlines()


@pytest.mark.parametrize("dotenv, parts", [
    (b"X" * (10 * 1024 * 1024) + b"=1\n", ["config: " + "X" * 50 + "...(10485760 characters)...X", ": unknown option"]),
    (b"listen=" + b"a" * (10 * 1024 * 1024) + b"\n", ["config: listen: 'aaa", "characters)...", "is not host:port"]),
    (b"hostname=\xff\xfe\x00binary\n", ["config: config: cannot read", "can't decode byte 0xff"]),
    (b"host\x1b[31mname\x00=x\n", ["config: host\\x1b[31mname\\x00: unknown option"]),
    (b"remotes=file:outbox\nallowed_sender=(a+)+$\n", ["config: allowed_sender: regex '(a+)+$': a repeated group"]),
], ids=["10mb-key", "10mb-value", "not-utf8", "escape-in-key", "nested-repetition"])
def test_7_hostile_config_is_one_bounded_printable_error_line(tmp_path, dotenv, parts):
    status, out, err = check_in(tmp_path, dotenv)
    assert status == 2 and out == ""
    assert err.startswith("smtprelay: config: ") and err.endswith("\n") and err.count("\n") == 1
    assert all(part in err for part in parts), err[:600]
    assert len(err) < 600 and err.isascii() and err[:-1].isprintable(), err[:600]


# -- regexes a client can make Python backtrack on (SPEC 2.3, 3.2) ----------------

@pytest.mark.parametrize("pattern, yes, no", [
    (r"^(?:ab)+$", ["abab"], ["aba"]),
    (r"@(?:foo|bar)\.example\.com$", ["a@bar.example.com"], ["a@baz.example.com"]),
])
def test_2_3_non_capturing_group_is_go_syntax(pattern, yes, no):
    compiled = config.parse_regex(pattern)
    assert all(compiled.search(text) for text in yes) and not any(compiled.search(text) for text in no)


@pytest.mark.parametrize("option", ["allowed_sender", "allowed_recipients"])
@pytest.mark.parametrize("pattern", [r"(a+)+$", r"^(\w+\s?)*$", r"@([a-z0-9-]+\.)*example\.com$",
                                     r"(a*){2,}b", r"((ab)*c)+", r"(?:x|a+)*y"])
def test_2_3_nested_repetition_is_refused_naming_the_option(tmp_path, option, pattern):
    ini = tmp_path / "relay.ini"
    write_ini(ini, {"listen": "127.0.0.1:0", "remotes": "file:outbox", option: pattern})
    with pytest.raises(config.ConfigError) as caught:
        config.from_file(str(ini))
    assert caught.value.option == option
    assert "repeated group that repeats inside, like (a+)+" in str(caught.value)


@pytest.mark.parametrize("pattern", [r"(a+)?b", r"(ab|cd)+", r"^([a-z0-9._%+-]+)@example\.com$",
                                     r"@([a-z0-9.-]+\.)?example\.com$", r"(x[a-z]*){1}y", r"a+b*(c|d)+"])
def test_2_3_single_repetition_is_accepted(pattern):
    assert config.parse_regex(pattern) is not None


def test_3_2_a_hostile_address_against_an_accepted_pattern_is_answered_at_once(relay_factory):
    relay = relay_factory(allowed_sender=r"^([a-z0-9._%+-]+)@(foo|bar)\.example\.com$",
                          allowed_recipients=r"@([a-z0-9.-]+\.)?example\.com$")
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")
        t.cmd("EHLO x")
        started = time.monotonic()
        assert t.cmd("MAIL FROM:<%s@foo.example.co>" % ("a" * 3000)).startswith("5")
        assert t.cmd("MAIL FROM:<a@foo.example.com>").startswith("250 ")
        assert t.cmd("RCPT TO:<b@%s!>" % ("a." * 1500)).startswith("5")
        assert time.monotonic() - started < 1.0
