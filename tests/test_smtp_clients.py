"""SPEC 3: real third-party SMTP clients (swaks, curl) against the relay.
Skipped where the binary is not installed."""

import shutil
import subprocess

import pytest

from conftest import outbox_messages
from smtp_talk import write_users

PASSWORD = "client-Pa55"

swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture
def tls_relay(relay_factory, certs, tmp_path):
    """A relay with starttls:// and tls:// listeners; AUTH when users=True."""
    def factory(users=False):
        options = {}
        if users:
            options["allowed_users"] = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
        relay = relay_factory(listen="starttls://127.0.0.1:0 tls://127.0.0.1:0",
                              local_cert=certs.cert_path, local_key=certs.key_path, **options)
        relay.starttls_port, relay.tls_port = relay.addresses[0][2], relay.addresses[1][2]
        return relay
    return factory


def run(argv):
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30)
    return done.returncode, done.stdout.decode("utf-8", "replace")


def run_swaks(port, *extra):
    return run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", "a@example.com",
                "--to", "b@example.com", "--helo", "swaks.test", "--timeout", "10"] + list(extra))


def swaks_ok(port, *extra):
    """Run swaks, which must succeed; returns its transcript."""
    code, out = run_swaks(port, *extra)
    assert code == 0, out
    return out


def curl_ok(tmp_path, url, body, *extra):
    """Send `body` from a@example.com to b@example.com with curl, which must succeed."""
    mail = tmp_path / "mail.txt"
    mail.write_bytes(body)
    code, out = run(["curl", "-sS", "--max-time", "10", url, "--mail-from", "a@example.com",
                     "--mail-rcpt", "b@example.com", "--upload-file", str(mail)] + list(extra))
    assert code == 0, out


@swaks
def test_3_swaks_plain(relay_factory):
    relay = relay_factory()
    out = swaks_ok(relay.port)
    assert "250 2.0.0 OK" in out
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["helo"] == "swaks.test" and meta["to"] == ["b@example.com"]


@swaks
def test_3_swaks_pipeline(relay_factory):
    relay = relay_factory()
    swaks_ok(relay.port, "--pipeline")
    assert len(outbox_messages(relay.outbox)) == 1


@swaks
def test_3_swaks_starttls(tls_relay):
    relay = tls_relay()
    out = swaks_ok(relay.starttls_port, "--tls")
    assert "220 2.0.0 Ready to start TLS" in out
    (meta, _), = outbox_messages(relay.outbox)
    assert meta["tls"] is True


@swaks
def test_3_swaks_implicit_tls(tls_relay):
    relay = tls_relay()
    swaks_ok(relay.tls_port, "--tlsc")
    assert len(outbox_messages(relay.outbox)) == 1


@swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_3_swaks_auth(tls_relay, mechanism):
    relay = tls_relay(users=True)
    out = swaks_ok(relay.starttls_port, "--tls", "--auth", mechanism,
                   "--auth-user", "alice", "--auth-password", PASSWORD)
    assert "235 2.7.0 Authentication successful" in out
    (meta, _), = outbox_messages(relay.outbox)
    assert meta["username"] == "alice"


@swaks
def test_3_swaks_auth_wrong_password(tls_relay):
    relay = tls_relay(users=True)
    code, out = run_swaks(relay.starttls_port, "--tls", "--auth", "PLAIN",
                          "--auth-user", "alice", "--auth-password", "wrong")
    assert code != 0
    assert "535 5.7.8" in out
    assert outbox_messages(relay.outbox) == []


@curl
def test_3_curl_smtp(relay_factory, tmp_path):
    relay = relay_factory()
    curl_ok(tmp_path, "smtp://127.0.0.1:%d" % relay.port,
            b"Subject: from curl\r\n\r\n.a line that starts with a dot\r\n")
    (_, message), = outbox_messages(relay.outbox)
    assert message.endswith(b"Subject: from curl\r\n\r\n.a line that starts with a dot\r\n")


@curl
def test_3_curl_smtps_with_auth(tls_relay, certs, tmp_path):
    relay = tls_relay(users=True)
    curl_ok(tmp_path, "smtps://localhost:%d" % relay.tls_port, b"Subject: from curl\r\n\r\nhello\r\n",
            "--cacert", certs.ca_path, "--user", "alice:" + PASSWORD)
    (meta, _), = outbox_messages(relay.outbox)
    assert meta["username"] == "alice" and meta["tls"] is True


@curl
def test_3_curl_starttls_required(tls_relay, certs, tmp_path):
    relay = tls_relay()
    curl_ok(tmp_path, "smtp://localhost:%d" % relay.starttls_port, b"Subject: x\r\n\r\nhello\r\n",
            "--ssl-reqd", "--cacert", certs.ca_path)
    (meta, _), = outbox_messages(relay.outbox)
    assert meta["tls"] is True
