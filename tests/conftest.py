"""Shared fixtures: test certificates, the real relay on loopback, an aiosmtpd
downstream that records what it receives (`sink`, `sink_factory`), raw-socket
servers for failures aiosmtpd cannot script (`MiniSMTP`, `Trickle`) and a
scripted HTTP webhook.

Every fixture owns its lifecycle: what it starts, it stops at teardown.
"""

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay_lib import logs
from relay_lib.config import settings as config
from smtp_talk import Talk


# -- certificates --------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject_cn, issuer_key, issuer_name, key, ca=False, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject_cn))
               .issuer_name(issuer_name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               # Key identifiers: Python 3.13's default contexts verify strictly (X509_STRICT).
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:  # X509_STRICT wants a CA to say it signs certificates
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(folder, stem, cert, key):
    cert_path = os.path.join(folder, stem + ".pem")
    key_path = os.path.join(folder, stem + ".key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A test CA, a server certificate for localhost/127.0.0.1/::1 and a client certificate."""
    folder = str(tmp_path_factory.mktemp("certs"))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("smtprelay test CA", ca_key, _name("smtprelay test CA"), ca_key, ca=True)
    ca_path, _ = _write_pair(folder, "ca", ca_cert, ca_key)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue("localhost", ca_key, ca_cert.subject, server_key, sans=sans)
    cert_path, key_path = _write_pair(folder, "server", server_cert, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("relay client", ca_key, ca_cert.subject, client_key)
    client_cert_path, client_key_path = _write_pair(folder, "client", client_cert, client_key)

    def client_context():
        """A client context that trusts the test CA."""
        ctx = ssl.create_default_context(cafile=ca_path)
        return ctx

    def server_context(cert=None, key=None, client_ca=None):
        """A server context with the localhost certificate (or `cert`/`key`);
        with `client_ca`, clients must present a certificate it signed."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert or cert_path, key or key_path)
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        return ctx

    return SimpleNamespace(folder=folder, ca_path=ca_path, cert_path=cert_path, key_path=key_path,
                           client_cert_path=client_cert_path, client_key_path=client_key_path,
                           client_context=client_context, server_context=server_context)


def make_ca_and_leaf(folder, names):
    """A second CA and a server certificate for `names` only (not localhost);
    returns [ca_path, cert_path, key_path]."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("other test CA", ca_key, _name("other test CA"), ca_key, ca=True)
    ca_path = os.path.join(folder, "other-ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    leaf = _issue(names[0], ca_key, ca_cert.subject, key, sans=sans)
    return [ca_path] + list(_write_pair(folder, "other", leaf, key))


# -- the relay ------------------------------------------------------------

def wait_until(predicate, timeout=5.0):
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def write_ini(path, options):
    with open(path, "w", encoding="utf-8") as f:
        for key, value in options.items():
            f.write("%s = %s\n" % (key, value))


@pytest.fixture(autouse=True)
def _relay_logger_restored():
    """Every test starts with the relay's logger as the last one found it:
    setup_logging() (run by the CLI tests) replaces its handlers, level and
    propagation, which would hide later tests' records from caplog."""
    logger = logs.log
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    added = [h for h in logger.handlers if h not in saved[0]]
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    for handler in added:
        handler.close()


@pytest.fixture
def relay_factory(tmp_path):
    """Start real relays from ini options (strings); each is stopped at teardown.

    Defaults: listen on 127.0.0.1:0, hostname relay.test, remotes file:outbox
    (the folder tmp_path/outbox). Returns the started Relay, with `.port`,
    `.host`, `.outbox` and `.settings` for convenience.
    """
    started = []
    threads_before = set(threading.enumerate())

    def factory(**options):
        merged = {"listen": "127.0.0.1:0", "hostname": "relay.test", "remotes": "file:outbox"}
        merged.update({k: str(v) for k, v in options.items()})
        ini = tmp_path / ("relay%d.ini" % len(started))
        write_ini(ini, merged)
        settings = config.from_file(str(ini))
        from relay_lib.service import Service

        relay = Service(settings)
        relay.start()
        started.append(relay)
        relay.settings = settings
        relay.host, relay.port = relay.addresses[0][1], relay.addresses[0][2]
        relay.outbox = str(tmp_path / "outbox")
        return relay

    yield factory
    for relay in started:
        relay.stop()
    for relay in started:
        assert wait_until(lambda relay=relay: relay.active_sessions == 0), "a connection slot leaked"
    def relay_threads():
        return [t.name for t in set(threading.enumerate()) - threads_before
                if t.is_alive() and ("process_request" in t.name or "serve_forever" in t.name
                                     or t.name.startswith("smtprelay"))]

    assert wait_until(lambda: not relay_threads()), "threads still running: %s" % relay_threads()


@pytest.fixture
def relay_log(caplog, monkeypatch):
    """caplog that sees every record of the relay's logger at every level.

    setup_logging() (run by other tests) turns propagation off; turn it back
    on for this test so the records reach caplog's handler.
    """
    monkeypatch.setattr(logs.log, "propagate", True)
    monkeypatch.setattr(logs.log, "level", logging.NOTSET)
    caplog.set_level(1)
    return caplog


@pytest.fixture
def relay(relay_factory):
    """A relay with the default options."""
    return relay_factory()


@pytest.fixture
def talk(relay):
    """A raw client to `relay`, past the greeting."""
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")
        yield t


@pytest.fixture
def ready(talk):
    """A raw client to `relay`, past EHLO."""
    assert talk.cmd("EHLO client.test").startswith("250-relay.test")
    return talk


def outbox_messages(folder):
    """[(envelope dict, message bytes)] of what the file: remote wrote."""
    found = []
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                meta = json.load(f)
            with open(os.path.join(folder, name[:-5] + ".eml"), "rb") as f:
                found.append((meta, f.read()))
    return found


# -- downstream SMTP servers ----------------------------------------------

def accepts_connections(port, host="127.0.0.1"):
    """True when something listens on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port(host="127.0.0.1"):
    """A port nobody listens on right now (aiosmtpd needs one before it starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Recorder:
    """aiosmtpd handler that keeps each envelope in `box`, or answers a scripted reply.

    `mail_reply` (at MAIL), `rcpt_reply` ({address: reply} at RCPT),
    `data_reply` (after the dot) and `delay` (before the DATA answer) script failures.
    """

    def __init__(self, pipelining):
        self.pipelining = pipelining
        self.box = []
        self.mechanisms = []
        self.connections = set()
        self.rcpt_reply = {}
        self.mail_reply = None
        self.data_reply = None
        self.delay = 0.0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.connections.add(session.peer)
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_reply:
            return self.rcpt_reply[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        self.box.append(SimpleNamespace(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options), content=envelope.original_content,
            login=session.auth_data, peer=session.peer,
            tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
            helo=session.host_name))
        return "250 2.0.0 Queued as Q%d" % len(self.box)


class _Controller(Controller):
    """aiosmtpd's Controller with implicit TLS and the SMTP options passed through."""

    def __init__(self, handler, host, port, implicit_tls, smtp_kwargs):
        self._smtp_kwargs = smtp_kwargs
        super().__init__(handler, hostname=host, port=port, ssl_context=implicit_tls,
                         server_hostname="localhost", ready_timeout=5)

    def factory(self):
        return SMTP(self.handler, hostname="sink.test", **self._smtp_kwargs)


class Downstream:
    """An aiosmtpd server that records what arrives: `box` (messages, with the
    AUTH login, TLS, peer and HELO name), `handler.mechanisms` (AUTH
    mechanisms used), `handler.connections` (peers that said EHLO).

    `mode` is plain, starttls or tls (with `context`); auth={user: password};
    `pipelining` advertises PIPELINING. Script failures through `handler`.
    """

    def __init__(self, context=None, mode="plain", auth=None, pipelining=False, host="127.0.0.1",
                 port=None):
        self.host = host
        self.port = port or free_port(host)
        self.handler = _Recorder(pipelining)
        kwargs = {"enable_SMTPUTF8": True}
        if auth is not None:
            def authenticator(server, session, envelope, mechanism, data):
                self.handler.mechanisms.append(mechanism)
                ok = (isinstance(data, LoginPassword)
                      and auth.get(data.login.decode()) == data.password.decode())
                return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)
            kwargs.update(authenticator=authenticator, auth_require_tls=False)
        if mode == "starttls":
            kwargs.update(tls_context=context)
        self.controller = _Controller(self.handler, host, self.port,
                                      context if mode == "tls" else None, kwargs)
        self.controller.start()

    @property
    def box(self):
        return self.handler.box

    def url(self, scheme="smtp", userinfo="", path="", query=""):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s:%d%s%s" % (scheme, userinfo + "@" if userinfo else "", host, self.port,
                                     "/" + path if path else "", "?" + query if query else "")

    def stop(self):
        if self.controller._thread is not None:
            self.controller.stop()


def stopped_at_teardown(make):
    """The body of a factory fixture (`yield from`): the factory calls
    `make(*args, **kw)`, and everything it made is stopped at teardown."""
    made = []

    def factory(*args, **kw):
        item = make(*args, **kw)
        made.append(item)
        return item

    yield factory
    for item in made:
        item.stop()


@pytest.fixture
def sink_factory(certs):
    """Start Downstreams: sink_factory(mode, context=None, auth=..., pipelining=..., host=...).

    TLS modes use the test CA's server certificate unless `context` is given.
    Every one is stopped at teardown.
    """
    def start(mode="plain", context=None, **kw):
        if context is None and mode != "plain":
            context = certs.server_context()
        return Downstream(context=context, mode=mode, **kw)

    yield from stopped_at_teardown(start)


@pytest.fixture
def sink(sink_factory):
    """A plain aiosmtpd downstream on loopback."""
    return sink_factory()


# -- a raw-socket SMTP server ------------------------------------------------

class MiniSMTP:
    """Answers SMTP from a thread per connection; records what it saw.

    `die_on_reuse` makes the first connection close silently when its second
    MAIL arrives (a pooled connection that died between messages, unnoticed
    by the client);
    `drop_in_data` closes in the middle of the body; `greeting` replaces 220;
    `messages_per_connection` answers the next MAIL with 421 and closes.
    `pipelined` records, per MAIL, whether RCPT and DATA had already arrived
    before MAIL was answered [R2920].
    """

    PIPELINE_WAIT = 0.25

    def __init__(self, pipelining=True, die_on_reuse=False, drop_in_data=False,
                 greeting=b"220 mini.test ESMTP", messages_per_connection=0):
        self.pipelining = pipelining
        self.die_on_reuse = die_on_reuse
        self.messages_per_connection = messages_per_connection
        self.drop_in_data = drop_in_data
        self.greeting = greeting
        self.connections = 0
        self.pipelined = []
        self.messages = []
        self.lines = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def url(self):
        return "smtp://127.0.0.1:%d" % self.port

    def stop(self):
        self._stop.set()
        self._accepter.join(5)
        self._sock.close()
        for t in self._threads:
            t.join(5)

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn, number):
        conn.settimeout(5)
        buf = b""

        def more(wait):
            nonlocal buf
            conn.settimeout(wait)
            try:
                data = conn.recv(65536)
            except socket.timeout:
                return False
            finally:
                conn.settimeout(5)
            if not data:
                raise EOFError
            buf += data
            return True

        def line():
            nonlocal buf
            while b"\r\n" not in buf:
                more(5)
            head, _, buf = buf.partition(b"\r\n")
            self.lines.append(head)
            return head

        try:
            conn.sendall(self.greeting + b"\r\n")
            if not self.greeting.startswith(b"220"):
                line()  # the client's QUIT
                return
            while not self._stop.is_set():
                cmd = line()
                verb = cmd[:4].upper()
                if verb == b"EHLO":
                    ext = b"250-PIPELINING\r\n" if self.pipelining else b""
                    conn.sendall(b"250-mini.test\r\n" + ext + b"250 8BITMIME\r\n")
                elif verb == b"RSET":
                    conn.sendall(b"250 2.0.0 OK\r\n")
                elif verb == b"MAIL" and self.die_on_reuse and number == 1 and self.messages:
                    return
                elif verb == b"MAIL" and self.messages_per_connection and sum(
                        1 for n, _ in self.messages if n == number) >= self.messages_per_connection:
                    conn.sendall(b"421 4.7.0 Too many messages on this connection\r\n")
                    return
                elif verb == b"MAIL":
                    deadline = time.monotonic() + self.PIPELINE_WAIT
                    while b"DATA\r\n" not in buf and time.monotonic() < deadline:
                        more(max(0.01, deadline - time.monotonic()))
                    self.pipelined.append(b"DATA\r\n" in buf)
                    conn.sendall(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    conn.sendall(b"250 2.1.5 OK\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    if self.drop_in_data:
                        more(5)  # some of the body, then the line goes dead
                        return
                    while b"\r\n.\r\n" not in buf:
                        more(5)
                    data, _, buf = buf.partition(b"\r\n.\r\n")
                    self.messages.append((number, data + b"\r\n"))
                    conn.sendall(b"250 2.0.0 OK queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"502 5.5.1 no\r\n")
        except (EOFError, OSError):
            return
        finally:
            conn.close()


@pytest.fixture
def mini():
    """Factory for MiniSMTP servers; each is stopped at teardown."""
    yield from stopped_at_teardown(MiniSMTP)


# -- an HTTP server that trickles its answer -----------------------------------

class Trickle:
    """Accepts one HTTP request and answers one byte every `gap` seconds."""

    def __init__(self, gap=0.3):
        self.gap = gap
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/scan" % self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self._sock.settimeout(5)
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b" " * 200
            try:
                conn.recv(1 << 20)
                for i in range(len(answer)):
                    if self._stop.wait(self.gap):
                        return
                    conn.sendall(answer[i:i + 1])
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


# -- a scanning webhook -----------------------------------------------------

class _WebhookHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        record = SimpleNamespace(path=self.path, headers=dict(self.headers), body=body,
                                 json=json.loads(body) if body else None)
        self.server.requests.append(record)
        status, answer, delay = self.server.script(record)
        if delay:
            time.sleep(delay)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode() if answer is not None else b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the relay gave up waiting; nothing to answer

    def log_message(self, fmt, *args):
        pass


@pytest.fixture
def webhook_factory():
    """Start real HTTP scanners on loopback; with an ssl `context`, HTTPS on
    https://localhost. Script one with
    `webhook.script = lambda request: (status, answer, delay)`; answer is a
    dict (sent as JSON), bytes (sent as is) or None (empty body).
    `webhook.requests` records each call (headers, body, json)."""
    started = []

    def factory(context=None):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _WebhookHandler)
        server.daemon_threads = True
        server.requests = []
        server.script = lambda request: (200, {"action": "accept"}, 0)
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="test-webhook", daemon=True)
        thread.start()
        started.append((server, thread))
        server.url = "%s://%s:%d/scan" % ("https" if context else "http",
                                          "localhost" if context else "127.0.0.1", server.server_address[1])
        return server

    yield factory
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def webhook(webhook_factory):
    """A plain-HTTP scanner from `webhook_factory`."""
    return webhook_factory()


# -- the relay as a separate process ------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relay_command():
    """How to start the relay: `python relay.py`, or the frozen binary named in
    SMTPRELAY_TEST_BINARY (so the same tests prove `make exe`'s output)."""
    import sys

    binary = os.environ.get("SMTPRELAY_TEST_BINARY")
    return [os.path.abspath(binary)] if binary else [sys.executable, os.path.join(ROOT, "relay.py")]
