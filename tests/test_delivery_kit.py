"""Helpers for the delivery, remotes and webhook tests (this module has no tests).

`Downstream` is an aiosmtpd server in plain, STARTTLS or implicit-TLS mode
that records what arrives (including the AUTH mechanism and the connection it
came on) and can advertise PIPELINING; `MiniSMTP` is a raw-socket server for
behaviours aiosmtpd cannot script (dropping a pooled connection, checking that
commands arrive pipelined); `Trickle` is an HTTP server that answers one byte
at a time. Everything binds to loopback.
"""

import asyncio
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay_lib import config, logs
from relay_lib.delivery import Delivery, Envelope, new_message_id

BODY = (b"From: app@example.com\r\nTo: b@example.org\r\nSubject: test\r\n\r\n"
        b"Hello.\r\n.leading dot line\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n")


def free_port(host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_loopback_works():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def settings_for(tmp_path, **options):
    """Settings loaded through the real config parser from ini options."""
    merged = {"hostname": "relay.test", "remote_timeout": "3s", "data_timeout": "5s"}
    merged.update({k: str(v) for k, v in options.items()})
    ini = tmp_path / ("delivery-%s.ini" % new_message_id())
    with open(ini, "w", encoding="utf-8") as f:
        for key, value in merged.items():
            f.write("%s = %s\n" % (key, value))
    return config.from_file(str(ini))


def envelope(mail_from="app@example.com", rcpts=("b@example.org",), **kw):
    values = dict(id=new_message_id(), peer="127.0.0.1", helo="printer.lan", user=None, tls=None,
                  esmtp=True, mail_from=mail_from, rcpts=list(rcpts))
    values.update(kw)
    return Envelope(**values)


def deliver_once(tmp_path, body=BODY, env=None, **options):
    """Deliver one message with a fresh Delivery; returns (reply, envelope)."""
    delivery = Delivery(settings_for(tmp_path, **options))
    env = env or envelope()
    try:
        return delivery.deliver(env, body), env
    finally:
        delivery.close()


def reply_line(reply):
    return str(reply)


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


# -- certificates that the `certs` fixture does not provide -----------------

def make_ca_and_leaf(folder, names):
    """A new CA and a server certificate for `names` only; returns (ca_path, cert, key)."""
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject, issuer, signing_key, key, ca, sans=()):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 signing_key.public_key()), critical=False))
        if ca:  # X509_STRICT (Python 3.13) wants a CA to say it signs certificates
            b = b.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue("other test CA", "other test CA", ca_key, ca_key, True)
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    leaf = issue(names[0], "other test CA", ca_key, key, False, sans)
    paths = [os.path.join(folder, n) for n in ("other-ca.pem", "other.pem", "other.key")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def server_context(cert, key, client_ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


# -- aiosmtpd downstream ---------------------------------------------------

class _Recorder:
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
    def __init__(self, handler, host, port, implicit_tls, smtp_kwargs):
        self._smtp_kwargs = smtp_kwargs
        super().__init__(handler, hostname=host, port=port, ssl_context=implicit_tls,
                         server_hostname="localhost", ready_timeout=5)

    def factory(self):
        return SMTP(self.handler, hostname="sink.test", **self._smtp_kwargs)


class Downstream:
    """An aiosmtpd server; `mode` is plain, starttls or tls; auth={user: password}."""

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


# -- a raw-socket SMTP server ------------------------------------------------

class MiniSMTP:
    """Answers SMTP from a thread per connection; records what it saw.

    `drop_rset` makes the first connection close silently when it reads RSET
    (a pooled connection that died between messages, unnoticed by the client);
    `drop_in_data` closes in the middle of the body; `greeting` replaces 220;
    `messages_per_connection` answers the next MAIL with 421 and closes.
    `pipelined` records, per MAIL, whether RCPT and DATA had already arrived
    before MAIL was answered [R2920].
    """

    PIPELINE_WAIT = 0.25

    def __init__(self, pipelining=True, drop_rset=False, drop_in_data=False,
                 greeting=b"220 mini.test ESMTP", messages_per_connection=0):
        self.pipelining = pipelining
        self.drop_rset = drop_rset
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
                    if self.drop_rset and number == 1:
                        return
                    conn.sendall(b"250 2.0.0 OK\r\n")
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
