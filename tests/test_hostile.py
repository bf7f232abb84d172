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
from relay_lib import logs
from relay_lib.config import settings as config
from relay_lib.ops import metrics_http
from relay_lib.outbound.oauth import MAX_LIFETIME, TokenError, TokenSource
from smtp_talk import Talk, write_users
from test_metrics import get
from test_proxy import ALLOWED, CLIENT, tlv, v1, v2

PASSWORD = "s3cret-Pa55"


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


# -- the PROXY header over sockets (SPEC 12) ----------------------------------

@pytest.fixture(params=["plain", "tls"])
def proxied_listener(request, relay_factory, certs):
    """A relay behind a load balancer on 127.0.0.0/8, plain or tls://, three
    slots and a 1 s read timeout; `.wrap(sock)` starts TLS on tls://."""
    listen = "127.0.0.1:0" if request.param == "plain" else "tls://127.0.0.1:0"
    relay = relay_factory(listen=listen, local_cert=certs.cert_path, local_key=certs.key_path,
                          proxy_nets="127.0.0.0/8", allowed_nets=ALLOWED, max_connections=3,
                          read_timeout="1s")
    relay.tls = request.param == "tls"
    if relay.tls:
        relay.wrap = lambda sock: certs.client_context().wrap_socket(sock, server_hostname="localhost")
    else:
        relay.wrap = lambda sock: sock
    return relay


def _mail_through(relay, t, data=b""):
    """After the header: (TLS,) the rest of the dialogue, pipelined in one write with `data`."""
    t.sock = relay.wrap(t.sock)
    t.send(data + b"EHLO printer.lan\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
           b"DATA\r\n")
    assert t.reply().startswith("220 ")
    assert t.reply().startswith("250-relay.test")
    assert t.replies(3) == ["250 2.1.0 OK", "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>"]
    assert t.cmd("Subject: x\r\n\r\nhello\r\n.").startswith("250 2.0.0 OK ")


@pytest.mark.parametrize("header", [v1(), v2(), v2(tlvs=tlv(0x05, b"u" * 2000))], ids=["v1", "v2", "v2-tlvs"])
def test_12_proxy_header_in_single_bytes_then_smtp_in_the_same_write(proxied_listener, header):
    relay = proxied_listener
    with Talk(relay.port) as t:
        for octet in header[:-1]:
            t.send(bytes([octet]))
        if relay.tls:  # the client's TLS starts after the header
            t.send(header[-1:])
            _mail_through(relay, t)
        else:  # the last header octet and the SMTP commands in one packet
            _mail_through(relay, t, header[-1:])
    assert wait_until(lambda: relay.active_sessions == 0)
    assert [meta["peer"] for meta, _ in outbox_messages(relay.outbox)] == [CLIENT]


STALLS = [
    v2(length=2000),  # says 2000 octets, sends 12, waits
    v1()[:-2],  # the whole v1 line but its CRLF, then nothing
    b"PROXY TCP4 192.0.2.10 ",
]


def test_12_proxy_stalled_headers_time_out_and_every_slot_comes_back(proxied_listener):
    relay = proxied_listener
    talks = [Talk(relay.port) for _ in STALLS]  # every slot
    try:
        started = time.monotonic()
        for t, data in zip(talks, STALLS):
            t.send(data)
        assert all(wait_until(t.closed, 5) and t.buf == b"" for t in talks)
        assert time.monotonic() - started < 3  # read_timeout is 1 s
    finally:
        for t in talks:
            t.close()
    assert wait_until(lambda: relay.active_sessions == 0)
    with Talk(relay.port) as t:
        t.send(v1())
        _mail_through(relay, t)


def test_12_proxy_tlv_bomb_is_closed_at_once_without_reading_it(proxied_listener):
    relay = proxied_listener
    with Talk(relay.port) as t:
        started = time.monotonic()
        t.send(v2(length=0xFFFF) + b"\x05\xff\xff" + b"B" * 4096)
        assert t.closed() and t.buf == b""
        assert time.monotonic() - started < 0.9  # refused on the length, not after read_timeout
    assert wait_until(lambda: relay.active_sessions == 0)


# -- AUTH (SPEC 2.4, 3.2) -------------------------------------------------------

def b64(data):
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def auth_relay(relay_factory, certs, tmp_path):
    users = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
    relay = relay_factory(listen="tls://127.0.0.1:0", local_cert=certs.cert_path, local_key=certs.key_path,
                          allowed_users=users)
    relay.users_path = users
    relay.client_context = certs.client_context
    return relay


@pytest.mark.parametrize("lines, expected", [
    (["AUTH PLAIN " + "QUFB" * 262144], "500 5.5.2 Line too long"),  # 1 MB of base64 on the AUTH line
    (["AUTH PLAIN", "QUFB" * 262144], "501 5.5.2 Cannot decode response"),  # ... as the response
    (["AUTH PLAIN " + b64(b"\0alice\0\xff\xfe\x80" + b"\xc3" * 2000)], "535 5.7.8 Authentication credentials invalid"),
    (["AUTH PLAIN " + b64(b"\0\xff\x1b[31malice\0" + PASSWORD.encode())], "535 5.7.8 Authentication credentials invalid"),
    (["AUTH LOGIN " + b64(b"alice"), b64(b"\x00\x01\xff" * 900)], "535 5.7.8 Authentication credentials invalid"),
    (["AUTH PLAIN " + b64(b"\0alice\0" + b"p" * 3000)], "535 5.7.8 Authentication credentials invalid"),
    (["AUTH PLAIN " + "@@@@"], "501 5.5.2 Cannot decode response"),
], ids=["1mb-line", "1mb-response", "non-utf8-password", "non-utf8-user", "login-binary", "3000-octets",
        "not-base64"])
def test_3_2_absurd_auth_gets_a_clear_reply_and_the_session_goes_on(auth_relay, relay_log, lines, expected):
    with Talk(auth_relay.port, tls=auth_relay.client_context()) as t:
        assert t.reply().startswith("220 ")
        assert t.cmd("EHLO x").startswith("250-")
        for line in lines[:-1]:
            assert t.cmd(line).startswith("334")
        assert t.cmd(lines[-1]) == expected
        # The same session goes on: the right password still works.
        assert t.cmd("AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode())) == "235 2.7.0 Authentication successful"
    assert not [r for r in relay_log.records if r.exc_info]
    formatter = logs.make_formatter("default", None)
    assert all("\x1b" not in formatter.format(r) for r in relay_log.records)


def test_2_4_users_file_replaced_while_many_threads_authenticate(auth_relay, relay_log, tmp_path):
    relay = auth_relay
    write_users(tmp_path / "other", {"alice": ("another-Pa55", None)})
    write_users(tmp_path / "same", {"alice": (PASSWORD, None)})
    answers, errors = [], []

    def client(number, password):
        try:  # each from an address of its own: no guessing penalty between them
            with Talk(relay.port, tls=relay.client_context(), timeout=10, source="127.0.0.%d" % number) as t:
                t.reply()
                t.cmd("EHLO x")
                answers.append(t.cmd("AUTH PLAIN " + b64(b"\0alice\0" + password))[:3])
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            errors.append(repr(exc))

    passwords = [PASSWORD.encode(), b"another-Pa55", b"wrong"] * 4
    threads = [threading.Thread(target=client, args=(i + 2, p + (b"%d" % i if p == b"wrong" else b"")))
               for i, p in enumerate(passwords)]
    for t in threads:
        t.start()
    contents = [(tmp_path / name).read_bytes() for name in ("other", "same")]
    staged = tmp_path / "staged"
    for i in range(20):  # swap the file under the running AUTHs, atomically as an editor would
        staged.write_bytes(contents[i % 2])
        os.replace(str(staged), relay.users_path)
    for t in threads:
        t.join(20)
    assert errors == [] and not any(t.is_alive() for t in threads)
    # Whichever file is in place, one of the two passwords is right: never a 454 or a 421.
    assert set(answers) == {"235", "535"} and len(answers) == len(passwords)
    assert not [r for r in relay_log.records if r.exc_info]
    assert wait_until(lambda: relay.active_sessions == 0)


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


def test_10_token_answer_of_100_mb_is_read_no_further_than_64_kb(answering):
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
@pytest.mark.parametrize("pattern", [r"(a+)+$", r"^(\w+\s?)*$", r"([a-z.]+\.)*$", r"(?i)([A-Z]+x)*$",
                                     r"(a*){2,}b", r"(?:x|a+)*y"])
def test_2_3_nested_repetition_is_refused_naming_the_option(tmp_path, option, pattern):
    ini = tmp_path / "relay.ini"
    write_ini(ini, {"listen": "127.0.0.1:0", "remotes": "file:outbox", option: pattern})
    with pytest.raises(config.ConfigError) as caught:
        config.from_file(str(ini))
    assert caught.value.option == option
    assert "repeated group that repeats inside, like (a+)+" in str(caught.value)


@pytest.mark.parametrize("pattern", [r"(a+)?b", r"(ab|cd)+", r"^([a-z0-9._%+-]+)@example\.com$",
                                     r"@([a-z0-9.-]+\.)?example\.com$", r"(x[a-z]*){1}y", r"a+b*(c|d)+",
                                     r"@([a-z0-9-]+\.)*example\.com$", r"((ab)*c)+"])
def test_2_3_single_or_delimited_repetition_is_accepted(pattern):
    """A group repeated whole is fine when each round ends with a character
    its own repeats cannot take: the text then splits one way only."""
    assert config.parse_regex(pattern) is not None


def test_3_2_a_hostile_address_against_an_accepted_pattern_is_answered_at_once(relay_factory):
    relay = relay_factory(allowed_sender=r"^([a-z0-9._%+-]+)@(foo|bar)\.example\.com$",
                          allowed_recipients=r"@([a-z0-9-]+\.)*example\.com$")
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")
        t.cmd("EHLO x")
        started = time.monotonic()
        assert t.cmd("MAIL FROM:<%s@foo.example.co>" % ("a" * 3000)).startswith("5")
        assert t.cmd("MAIL FROM:<a@foo.example.com>").startswith("250 ")
        assert t.cmd("RCPT TO:<b@%s!>" % ("a." * 1500)).startswith("5")
        assert time.monotonic() - started < 1.0


# -- what a hostile HELO does to the log (SPEC 6, 7) -------------------------------

def test_7_helo_full_of_escape_sequences_is_logged_escaped_and_bounded(relay_factory, relay_log):
    relay = relay_factory()
    hostile = ("\x1b[31m\x1b]0;owned\x07\x08\x00\x7f" * 400)[:4000]
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")
        t.send(b"HELO " + hostile.encode("latin-1") + b"\r\n")
        assert t.reply().startswith("250 ")
        assert t.cmd("EHLO " + "x" * 5000).startswith("500 5.5.2 Line too long")
        assert t.to_data().startswith("354 ")
        assert t.cmd("Subject: x\r\n\r\nhello\r\n.").startswith("250 ")
    for fmt in ("default", "json", "plain"):
        formatter = logs.make_formatter(fmt, None)
        for record in relay_log.records:
            line = formatter.format(record)
            assert "\n" not in line and len(line) < 4300, line[:200]
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line), line[:200]
