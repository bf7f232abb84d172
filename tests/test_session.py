"""The session state machine on its own: address parsing, and hypothesis
fuzzing of whole sessions over a socketpair (SPEC 3.2: every input gets a
well-formed reply, nothing raises, nothing hangs)."""

import logging
import re
import socket
import ssl
import threading

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from relay_lib.config import settings as config
from relay_lib.delivery.steps import Delivery
from relay_lib.inbound.policy import Users
from relay_lib.inbound.server import make_server_context
from relay_lib.inbound.mailpath import _SIMPLE_PATH, _parse_path_full, parse_path
from relay_lib.inbound.session import Phase, Session
from relay_lib.inbound.wire import Wire
from smtp_talk import write_users


# -- parse_path -----------------------------------------------------------------

@pytest.mark.parametrize("text, null_ok, addr, params", [
    ("<a@example.com>", True, "a@example.com", []),
    (" <a@example.com>", True, "a@example.com", []),
    ("<>", True, "", []),
    ("<a@example.com> SIZE=10 BODY=8BITMIME", True, "a@example.com", ["SIZE=10", "BODY=8BITMIME"]),
    ('<"john doe"@example.com>', True, '"john doe"@example.com', []),
    ('<"a>b\\"c"@example.com>', True, '"a>b\\"c"@example.com', []),
    ("<@hop1,@hop2:u@example.com>", False, "u@example.com", []),
    ("<postmaster>", False, "postmaster", []),
    ("<scanner>", True, "scanner", []),
    ("<a@[192.0.2.1]>", False, "a@[192.0.2.1]", []),
    ("<j\u00f6rg@b\u00fccher.example>", False, "j\u00f6rg@b\u00fccher.example", []),
    ("a@example.com", True, "a@example.com", []),
    (" a@example.com SIZE=10  BODY=8BITMIME", True, "a@example.com", ["SIZE=10", "BODY=8BITMIME"]),
    ("scanner", True, "scanner", []),
    ("Postmaster", False, "Postmaster", []),
    ("@hop:u@example.com", False, "u@example.com", []),
])
def test_3_2_parse_path_accepts(text, null_ok, addr, params):
    assert parse_path(text, null_ok) == (addr, params)


@pytest.mark.parametrize("text, null_ok", [
    ("a@example.com>", True), ("a<b@example.com", True), ("a@", True), ("b", False),
    ('"a b"@example.com', True), ("a\x00@example.com", True), ("<a@example.com", True), ("<>", False), ("<a b@example.com>", True),
    ("<a@example.com>junk", True), ("<@hop u@example.com>", False), ("<a@>", True), ("<@>", True),
    ("<scanner>", False), ("<a<b@example.com>", True), ('<"unterminated@example.com>', True),
    ("<a\x00@example.com>", True), ("<a@b@example.com>", True), ("", True),
])
def test_3_2_parse_path_refuses(text, null_ok):
    with pytest.raises(ValueError):
        parse_path(text, null_ok)


@given(st.text(max_size=80), st.booleans())
def test_3_2_parse_path_only_raises_value_error(text, null_ok):
    try:
        addr, params = parse_path(text, null_ok)
    except ValueError:
        return
    assert "<" not in addr.replace('"<', "") or '"' in addr
    assert all(" " not in p for p in params)


@given(st.from_regex(r"\A ?<[a-z.\x00-\x7f\u00e9]{0,12}@[a-z.\[\]:\x00-\x7f]{0,12}>( [A-Z=0-9 ]{0,10})?\Z"),
       st.booleans())
def test_3_2_parse_path_fast_path_agrees_with_the_full_parser(text, null_ok):
    """The regex fast path must agree with the loop on everything it matches."""
    text = text.lstrip(" ")
    if _SIMPLE_PATH.match(text):
        assert parse_path(text, null_ok) == _parse_path_full(text, null_ok)


@given(st.from_regex(r"\A ?[a-z.!#\x00-\x7f]{0,12}(@[a-z.\[\]:\x00-\x7f]{0,12})?( [A-Z=0-9 <>]{0,10})?\Z"),
       st.booleans())
def test_3_2_parse_path_bare_address_is_the_first_word(text, null_ok):
    """Without brackets: the first word, checked as `<word>` would be, and the
    rest as parameters (Postfix); never a different split."""
    stripped = text.lstrip(" ")
    word, _, rest = stripped.partition(" ")
    try:
        got = parse_path(text, null_ok)
    except ValueError:
        if not word or stripped.startswith("<") or "<" in word or ">" in word:
            return
        with pytest.raises(ValueError):
            _parse_path_full("<%s> %s" % (word, rest), null_ok)
        return
    if not stripped.startswith("<"):
        assert got == _parse_path_full("<%s> %s" % (word, rest), null_ok)
        assert got[1] == rest.split()


# -- whole sessions over a socketpair ------------------------------------------

@pytest.fixture(scope="module")
def relay_settings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    ini = folder / "relay.ini"
    ini.write_text("hostname = relay.test\nremotes = file:outbox\nread_timeout = 2s\n"
                   "data_timeout = 2s\nmax_message_size = 2000\nmax_recipients = 3\n")
    return config.from_file(str(ini))


@pytest.fixture(scope="module")
def auth_settings(tmp_path_factory, certs):
    """A STARTTLS listener with AUTH required and local_forcetls."""
    folder = tmp_path_factory.mktemp("fuzz-auth")
    users = write_users(folder / "users", {"alice": ("pw", "a@example.com")})
    ini = folder / "relay.ini"
    ini.write_text("hostname = relay.test\nremotes = file:outbox\nread_timeout = 2s\n"
                   "data_timeout = 2s\nlisten = starttls://127.0.0.1:0\nlocal_forcetls = true\n"
                   "local_cert = %s\nlocal_key = %s\nallowed_users = %s\n"
                   % (certs.cert_path, certs.key_path, users))
    settings = config.from_file(str(ini))
    return settings, Users(users, settings.auth_cache_ttl, settings.read_timeout), make_server_context(settings)


@pytest.fixture(scope="module")
def delivery(relay_settings):
    d = Delivery(relay_settings)
    yield d
    d.close()


def _session_thread(wire, run):
    """Start `run` in a thread that records any exception escaping it and
    closes the wire at the end; returns (thread, list of escaped exceptions)."""
    crashed = []

    def guarded():
        try:
            run()
        except BaseException as exc:  # the test wants to see any escape
            crashed.append(exc)
        finally:
            wire.close()

    thread = threading.Thread(target=guarded)
    thread.start()
    return thread, crashed


def converse(settings, delivery, data: bytes, users=None, starttls_context=None):
    """Run one session over a socketpair, send `data`, close; return
    (everything the session sent, the session thread's crash or None)."""
    server, client = socket.socketpair()
    wire = Wire(server, settings.read_timeout, settings.write_timeout, settings.data_timeout)
    session = Session(settings, wire, "127.0.0.1", delivery, users=users,
                      starttls_context=starttls_context)
    thread, crashed = _session_thread(wire, session.run)
    sender = threading.Thread(target=_send_and_shut, args=(client, data))
    sender.start()
    received = bytearray()
    client.settimeout(10)
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += chunk
    sender.join(10)
    thread.join(10)
    client.close()
    assert not thread.is_alive(), "session hangs"
    return bytes(received), crashed[0] if crashed else None


def _send_and_shut(sock, data):
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the session closed first (QUIT, HTTP, error limit): that is allowed


REPLY_LINE = re.compile(rb"^[2-5][0-9]{2}([ -][\x20-\x7e\x80-\xff]*)?$")
ENHANCED = re.compile(rb"^[245][0-9]{2}[ -][245]\.[0-9]{1,3}\.[0-9]{1,3} ")


def check_replies(data: bytes):
    # After "220 Ready to start TLS" the bytes are TLS: a failed handshake
    # ends with OpenSSL's alert (OpenSSL 3 sends decode_error on an early
    # EOF), which is no SMTP reply.
    ready = data.find(b"220 2.0.0 Ready to start TLS\r\n")
    if ready >= 0:
        data = data[:ready + len(b"220 2.0.0 Ready to start TLS\r\n")]
    assert data.endswith(b"\r\n"), data[-80:]
    lines = data[:-2].split(b"\r\n")
    assert lines[0].startswith(b"220 ")
    ehlo = False
    for line in lines[1:]:
        assert REPLY_LINE.match(line), line
        code = line[:3]
        if code == b"250" and (line[3:4] == b"-" or ehlo):
            ehlo = line[3:4] == b"-"  # an EHLO reply's lines carry no enhanced code
            continue
        if code in (b"334", b"354") or (code == b"250" and b"relay.test" == line[4:]):
            continue
        assert ENHANCED.match(line), line
    return lines


def assert_survived(received, crashed, caplog):
    """Nothing escaped the session, every reply is well formed, and the
    last-resort handler (421 4.3.0, logged as an error) never ran."""
    assert crashed is None
    check_replies(received)
    assert b"421 4.3.0" not in received
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()


VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "STARTTLS",
         "AUTH", "ehlo", "mail", "rcpt", "data", "BOGUS", "QUIT", "GET"]
ARGS = ["", "x", "client.test", "FROM:<a@example.com>", "TO:<b@example.com>", "FROM:<>",
        "TO:<>", "FROM:<a@example.com> SIZE=99999", "PLAIN", "LOGIN", "PLAIN AGFAYg==",
        "FROM:<\u00e9@x> SMTPUTF8", "TO:<@a:b@c>", "LOGIN YWxpY2U=", "PLAIN AGFsaWNlAHB3", "*",
        "=", "YWxpY2U=", "cHc="]

command = st.one_of(
    st.tuples(st.sampled_from(VERBS), st.sampled_from(ARGS)).map(
        lambda va: ("%s %s" % va).strip().encode("utf-8")),
    st.binary(max_size=60),
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
)
line_end = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n.\r\n", b"\n.\n", b""])
conversation = st.lists(st.tuples(command, line_end), max_size=25).map(
    lambda parts: b"".join(c + e for c, e in parts))


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=conversation)
def test_3_2_fuzzed_sessions_always_get_well_formed_replies(relay_settings, delivery, caplog, data):
    caplog.set_level(logging.ERROR, logger="smtprelay")
    received, crashed = converse(relay_settings, delivery, data)
    assert_survived(received, crashed, caplog)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=conversation)
def test_3_2_fuzzed_auth_sessions_always_get_well_formed_replies(auth_settings, delivery, caplog, data):
    settings, users, context = auth_settings
    caplog.set_level(logging.ERROR, logger="smtprelay")
    received, crashed = converse(settings, delivery, data, users=users, starttls_context=context)
    assert_survived(received, crashed, caplog)


def converse_tls(settings, delivery, users, server_context, client_context, data: bytes):
    """Like converse(), on implicit TLS, so AUTH runs its whole exchange.

    One TLS object must not be read and written from two threads, so the
    client sends everything, then a tail that ends any state (a line end, a
    lone dot for DATA, QUIT), then reads until the session closes.
    """
    server, client = socket.socketpair()
    wire = Wire(server, settings.read_timeout, settings.write_timeout, settings.data_timeout)

    def run():
        wire.start_tls(server_context)
        Session(settings, wire, "127.0.0.1", delivery, users=users, implicit_tls=True).run()

    thread, crashed = _session_thread(wire, run)
    client.settimeout(10)
    tls = client_context.wrap_socket(client, server_hostname="localhost")
    received = bytearray()
    try:
        tls.sendall(data + b"\r\n.\r\nQUIT\r\n")
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # the session closed first (HTTP verb, error limit): allowed
    thread.join(10)
    tls.close()
    assert not thread.is_alive(), "session hangs"
    return bytes(received), crashed[0] if crashed else None


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=conversation)
def test_3_2_fuzzed_tls_auth_sessions_always_get_well_formed_replies(auth_settings, delivery, certs,
                                                                    caplog, data):
    settings, users, context = auth_settings
    caplog.set_level(logging.ERROR, logger="smtprelay")
    received, crashed = converse_tls(settings, delivery, users, context, certs.client_context(), data)
    assert_survived(received, crashed, caplog)


def test_3_2_fuzz_tls_harness_reaches_auth(auth_settings, delivery, certs):
    settings, users, context = auth_settings
    received, crashed = converse_tls(settings, delivery, users, context, certs.client_context(),
                                     b"EHLO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\ncHc=\r\n"
                                     b"MAIL FROM:<a@example.com>\r\n")
    assert crashed is None
    lines = check_replies(received)
    assert b"235 2.7.0 Authentication successful" in lines
    assert b"250 2.1.0 OK" in lines
    assert lines[-1] == b"221 2.0.0 Bye"


def test_3_2_fuzz_harness_sees_a_whole_transaction(relay_settings, delivery):
    received, crashed = converse(relay_settings, delivery, b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n"
                                 b"RCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    lines = check_replies(received)
    assert crashed is None
    assert lines[-2].startswith(b"250 2.0.0 OK ") and lines[-1] == b"221 2.0.0 Bye"


def test_3_2_phase_follows_the_transaction(relay_settings, delivery):
    """The phase moves only as the SPEC 3.2 sequence allows."""
    server, client = socket.socketpair()
    wire = Wire(server, 2, 2, 2)
    session = Session(relay_settings, wire, "127.0.0.1", delivery)
    seen = []
    for line, phase in [(b"NOOP", Phase.CONNECTED), (b"MAIL FROM:<a@b.c>", Phase.CONNECTED),
                        (b"EHLO x", Phase.READY), (b"RCPT TO:<b@c.d>", Phase.READY),
                        (b"MAIL FROM:<a@b.c>", Phase.MAIL), (b"RCPT TO:<b@c.d>", Phase.RCPT),
                        (b"RSET", Phase.READY), (b"HELO y", Phase.READY)]:
        session.handle(line)
        seen.append(session.phase)
        assert session.phase is phase, line
    wire.close()
    client.close()
