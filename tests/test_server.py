"""SPEC 3.1 connection handling, SPEC 6 shutdown, and the server's promise
that no client can leak a slot or kill a thread silently (SPEC 7)."""

import dataclasses
import logging
import smtplib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import accepts_connections, outbox_messages, wait_until
from relay_lib.config import settings as config
from relay_lib.delivery.aliases import Aliases
from relay_lib.inbound.server import Relay, make_server_context
from relay_lib.service import Service
from smtp_talk import Talk


def ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")


# -- 3.1 allowed_nets -----------------------------------------------------------

def test_3_1_peer_outside_allowed_nets_is_554(relay_factory):
    relay = relay_factory(allowed_nets="10.0.0.0/8 192.168.0.0/16")
    with Talk(relay.port) as t:
        assert t.reply() == "554 5.7.1 Access denied"
        assert t.closed()
    assert relay.active_sessions == 0


def test_3_1_empty_allowed_nets_admits_anyone(relay_factory):
    relay = relay_factory(allowed_nets='""')
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")


@needs_ipv6
def test_3_1_ipv6_listener(relay_factory):
    relay = relay_factory(listen="[::1]:0", allowed_nets="::1/128")
    assert relay.addresses[0][1] == "::1"
    with Talk(relay.port, host="::1") as t:
        assert t.reply().startswith("220 ")
        assert t.cmd("EHLO x").startswith("250-")


@needs_ipv6
def test_3_1_ipv4_mapped_peer_is_compared_as_ipv4(relay_factory):
    relay = relay_factory(listen="[::]:0", allowed_nets="127.0.0.0/8")
    with Talk(relay.port, host="127.0.0.1") as t:
        assert t.reply().startswith("220 ")
        t.cmd("EHLO x")
        t.to_data()
        assert t.cmd("x\r\n.").startswith("250 ")
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["peer"] == "127.0.0.1"
    with Talk(relay.port, host="::1") as t:
        assert t.reply() == "554 5.7.1 Access denied"


def test_3_1_several_listeners(relay_factory, certs):
    relay = relay_factory(listen="127.0.0.1:0 starttls://127.0.0.1:0 tls://127.0.0.1:0",
                          local_cert=certs.cert_path, local_key=certs.key_path)
    schemes = [a[0] for a in relay.addresses]
    assert schemes == ["plain", "starttls", "tls"]
    plain, starttls, tls = (a[2] for a in relay.addresses)
    with Talk(plain) as t:
        t.reply()
        assert "STARTTLS" not in t.cmd("EHLO x")
    with Talk(starttls) as t:
        t.reply()
        assert "STARTTLS" in t.cmd("EHLO x")
    with Talk(tls, tls=certs.client_context()) as t:
        assert t.reply().startswith("220 ")


# -- 3.1 max_connections ---------------------------------------------------------

def test_3_1_max_connections(relay_factory):
    relay = relay_factory(max_connections="2")
    first, second = Talk(relay.port), Talk(relay.port)
    assert first.reply().startswith("220 ") and second.reply().startswith("220 ")
    with Talk(relay.port) as third:
        assert third.reply() == "421 4.7.0 relay.test Too many connections, try again later"
        assert third.closed()
    assert first.cmd("QUIT").startswith("221 ") and second.cmd("QUIT").startswith("221 ")
    first.close()
    second.close()
    assert wait_until(lambda: relay.active_sessions == 0)
    with Talk(relay.port) as fourth:
        assert fourth.reply().startswith("220 ")
        assert fourth.cmd("NOOP") == "250 2.0.0 OK"


def test_3_1_max_connections_on_tls_listener(relay_factory, certs):
    relay = relay_factory(max_connections="1", listen="tls://127.0.0.1:0",
                          local_cert=certs.cert_path, local_key=certs.key_path)
    with Talk(relay.port, tls=certs.client_context()) as first:
        assert first.reply().startswith("220 ")
        with Talk(relay.port, tls=certs.client_context()) as second:
            assert second.reply().startswith("421 4.7.0 ")


def test_3_1_slots_never_leak(relay_factory):
    """Sessions that end by every kind of error all give their slot back."""
    relay = relay_factory(max_connections="3", read_timeout="1s", data_timeout="1s")
    endings = [
        lambda t: t.send(b"GET / HTTP/1.0\r\n\r\n"),
        lambda t: t.send(b"BOGUS\r\n" * 30),
        lambda t: t.send(b"x" * 50000),
        lambda t: t.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"),
        lambda t: t.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\npartial"),
    ]
    for end in endings:  # the client goes away
        t = Talk(relay.port)
        t.reply()
        end(t)
        t.close()
    timeouts = [
        lambda t: None,  # silent: read_timeout
        lambda t: t.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\npartial"),  # data_timeout
    ]
    for stall in timeouts:  # the client stays and the relay gives up on it
        with Talk(relay.port) as t:
            t.reply()
            stall(t)
            last = t.reply()
            while not last.startswith("421"):
                last = t.reply()
            assert last == "421 4.4.2 Timeout"
    assert wait_until(lambda: relay.active_sessions == 0, timeout=5)
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")


# -- SPEC 7: many clients ------------------------------------------------------

def test_7_robustness_with_200_concurrent_clients(relay_factory):
    relay = relay_factory(max_connections="250")
    clients = [Talk(relay.port, timeout=30) for _ in range(200)]
    try:
        for t in clients:
            assert t.reply().startswith("220 ")
        assert relay.active_sessions == 200

        def transaction(i_t):
            i, t = i_t
            t.send(b"EHLO c%d\r\nMAIL FROM:<a%d@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" % (i, i))
            assert t.replies(4)[-1].startswith("354 ")
            t.send(b"Subject: %d\r\n\r\nhello\r\n.\r\nQUIT\r\n" % i)
            return t.replies(2)

        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(transaction, enumerate(clients)))
    finally:
        for t in clients:
            t.close()
    assert all(r[0].startswith("250 2.0.0 OK ") and r[1] == "221 2.0.0 Bye" for r in results)
    assert len(outbox_messages(relay.outbox)) == 200


# -- 6: shutdown ---------------------------------------------------------------

def test_6_stop_sends_421_to_idle_sessions(relay_factory):
    relay = relay_factory()
    with Talk(relay.port, ehlo="x") as t:
        relay.stop(timeout=5)
        assert t.reply() == "421 4.3.2 Shutting down"
        assert t.closed()
    assert relay.active_sessions == 0
    with pytest.raises(OSError):
        Talk(relay.port, timeout=1)


def test_6_stop_lets_a_message_in_data_finish(relay_factory):
    relay = relay_factory()
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        t.cmd("RCPT TO:<b@example.com>")
        assert t.cmd("DATA").startswith("354 ")
        t.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        stopper = threading.Thread(target=relay.stop, kwargs={"timeout": 10})
        stopper.start()
        # The listener closes while the message is still being received.
        assert wait_until(lambda: not accepts_connections(relay.port))
        t.send(b"second half\r\n.\r\n")
        assert t.reply().startswith("250 2.0.0 OK ")
        assert t.reply() == "421 4.3.2 Shutting down"
        stopper.join(10)
        assert not stopper.is_alive()
    (meta, message), = outbox_messages(relay.outbox)
    assert message.endswith(b"first half\r\nsecond half\r\n")


def test_6_stop_is_quick_with_no_sessions(relay_factory):
    relay = relay_factory()
    stopper = threading.Thread(target=relay.stop)
    stopper.start()
    stopper.join(2)
    assert not stopper.is_alive()


# -- TLS contexts and certificate errors -----------------------------------------

def test_2_3_bad_certificate_is_a_config_error(relay_factory, certs, tmp_path):
    relay = relay_factory(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                          local_key=certs.key_path)
    bad = tmp_path / "garbage.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    settings = dataclasses.replace(relay.settings, local_cert=str(bad))
    with pytest.raises(config.ConfigError) as err:
        make_server_context(settings)
    assert err.value.option == "local_cert"
    missing = dataclasses.replace(relay.settings, local_key=str(tmp_path / "missing.key"))
    with pytest.raises(config.ConfigError):
        Service(missing).start()


def test_2_3_key_of_another_certificate_is_a_config_error(relay_factory, certs):
    relay = relay_factory(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                          local_key=certs.key_path)
    settings = dataclasses.replace(relay.settings, local_key=certs.client_key_path)
    with pytest.raises(config.ConfigError):
        make_server_context(settings)


def test_2_3_plain_listeners_need_no_certificate(relay_factory):
    relay = relay_factory()
    assert make_server_context(relay.settings) is None


# -- one failing session does not hurt the others ---------------------------------

class _BrokenDelivery:
    """A message handler that fails with a bug, to prove the session's last-resort handler."""

    def deliver(self, envelope, body):
        raise RuntimeError("bug in delivery")


def test_3_2_internal_error_is_421_and_logged(relay_factory, caplog, capsys):
    relay = relay_factory()
    settings = relay.settings
    broken = Relay(settings, _BrokenDelivery(), Aliases(None))
    broken.start()
    try:
        caplog.set_level(logging.ERROR, logger="smtprelay")
        port = broken.addresses[0][2]
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPException) as err:
                client.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
        assert "4.3.0" in str(err.value)
        assert any(r.exc_info and "bug in delivery" in str(r.exc_info[1]) for r in caplog.records)
        with Talk(port) as t:  # the relay still serves
            assert t.reply().startswith("220 ")
    finally:
        broken.stop(timeout=5)
    assert broken.active_sessions == 0
    assert "Traceback" not in capsys.readouterr().err


# -- 6: logging ------------------------------------------------------------------

def test_6_refusals_are_logged_as_warnings_with_reasons(relay_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="smtprelay")
    relay = relay_factory(allowed_recipients=r"@example\.com$")
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("MAIL FROM:<a@example.com>")
        t.cmd("RCPT TO:<b@elsewhere.test>")
        t.cmd("QUIT")
    denied = relay_factory(allowed_nets="10.0.0.0/8")
    with Talk(denied.port) as t:
        t.reply()
    warnings = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records
                if r.levelno == logging.WARNING]
    refused = [f for m, f in warnings if m == "refused"]
    assert refused and refused[0]["reply"].startswith("550 5.7.1") and refused[0]["rcpt"] == "b@elsewhere.test"
    assert any("allowed_nets" in m and f["peer"] == "127.0.0.1" for m, f in warnings)
    events = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "connected" in events and "disconnected" in events  # the dialogue itself is trace


class _RefusingDelivery:
    """A message handler that refuses through SmtpError, the typed path of STYLE 6."""

    def deliver(self, envelope, body):
        from relay_lib.replies import Reply, SmtpError
        raise SmtpError(Reply(554, "5.7.1", "Refused by policy"))


def test_3_2_smtp_error_becomes_its_reply(relay_factory):
    relay = relay_factory()
    refusing = Relay(relay.settings, _RefusingDelivery(), Aliases(None))
    refusing.start()
    try:
        with Talk(refusing.addresses[0][2], ehlo="x") as t:
            t.to_data()
            assert t.cmd("x\r\n.") == "554 5.7.1 Refused by policy"
            assert t.cmd("NOOP") == "250 2.0.0 OK"
    finally:
        refusing.stop(timeout=5)
