"""Shared fixtures: test certificates, the real relay on loopback, an aiosmtpd
downstream that records what it receives, and a scripted HTTP webhook.

Every fixture owns its lifecycle: what it starts, it stops at teardown.
"""

import datetime
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay_lib import config


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

    def server_context():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx

    return SimpleNamespace(folder=folder, ca_path=ca_path, cert_path=cert_path, key_path=key_path,
                           client_cert_path=client_cert_path, client_key_path=client_key_path,
                           client_context=client_context, server_context=server_context)


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
        from relay_lib.server import Relay

        relay = Relay(settings)
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
        assert wait_until(lambda: relay.active_sessions == 0), "a connection slot leaked"
    def relay_threads():
        return [t.name for t in set(threading.enumerate()) - threads_before
                if t.is_alive() and ("process_request" in t.name or "serve_forever" in t.name
                                     or t.name.startswith("smtprelay"))]

    assert wait_until(lambda: not relay_threads()), "threads still running: %s" % relay_threads()


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


# -- a downstream SMTP server ---------------------------------------------

def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RecordingHandler:
    """aiosmtpd handler that keeps each envelope in `box`, or answers `reply`."""

    def __init__(self):
        self.box = []
        self.reply = None      # e.g. "550 5.7.1 No thanks" for DATA
        self.rcpt_reply = {}   # address -> reply at RCPT
        self.delay = 0.0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_reply:
            return self.rcpt_reply[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            import asyncio
            await asyncio.sleep(self.delay)
        if self.reply:
            return self.reply
        self.box.append(SimpleNamespace(mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
                                        content=envelope.original_content, login=session.login_data,
                                        tls=session.ssl is not None, peer=session.peer))
        return "250 2.0.0 Queued"


class _Controller(Controller):
    """aiosmtpd's Controller with implicit TLS and AUTH options passed through."""

    def __init__(self, handler, port, implicit_tls=None, **smtp_kwargs):
        self._smtp_kwargs = smtp_kwargs
        super().__init__(handler, hostname="127.0.0.1", port=port, ssl_context=implicit_tls,
                         server_hostname="localhost", ready_timeout=5)

    def factory(self):
        from aiosmtpd.smtp import SMTP
        return SMTP(self.handler, hostname="sink.test", **self._smtp_kwargs)


@pytest.fixture
def sink_factory(certs):
    """Start aiosmtpd downstreams: mode plain, starttls or tls; auth={user: password}.

    Returns the controller, with `.port`, `.box` (received messages),
    `.handler` (set `.reply`, `.rcpt_reply`, `.delay` to script failures).
    """
    started = []

    def factory(mode="plain", auth=None, require_starttls=False):
        handler = RecordingHandler()
        kwargs = {}
        if auth is not None:
            def authenticator(server, session, envelope, mechanism, data):
                ok = isinstance(data, LoginPassword) and auth.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)
            kwargs.update(authenticator=authenticator, auth_require_tls=False)
        if mode == "starttls":
            kwargs.update(tls_context=certs.server_context(), require_starttls=require_starttls)
        port = free_port()
        controller = _Controller(handler, port, implicit_tls=certs.server_context() if mode == "tls" else None,
                                 **kwargs)
        controller.start()
        started.append(controller)
        controller.box = handler.box
        controller.port = port
        return controller

    yield factory
    for controller in started:
        controller.stop()


@pytest.fixture
def sink(sink_factory):
    """A plain aiosmtpd downstream on loopback."""
    return sink_factory()


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
def webhook():
    """A real HTTP scanner on loopback. Script it with
    `webhook.script = lambda request: (status, answer, delay)`; answer is a
    dict (sent as JSON), bytes (sent as is) or None (empty body).
    `webhook.requests` records each call (headers, body, json)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WebhookHandler)
    server.daemon_threads = True
    server.requests = []
    server.script = lambda request: (200, {"action": "accept"}, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-webhook", daemon=True)
    thread.start()
    server.url = "http://127.0.0.1:%d/scan" % server.server_address[1]
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- the relay as a separate process ------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relay_command():
    """How to start the relay: `python relay.py`, or the frozen binary named in
    SMTPRELAY_TEST_BINARY (so the same tests prove `make exe`'s output)."""
    import sys

    binary = os.environ.get("SMTPRELAY_TEST_BINARY")
    return [os.path.abspath(binary)] if binary else [sys.executable, os.path.join(ROOT, "relay.py")]
