"""SPEC 4.2: the scanning webhook, against a real http.server on loopback."""

import base64
import hashlib
import hmac
import os
import re
import smtplib
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Trickle, accepts_connections, free_port, outbox_messages, wait_until
from relay_lib.delivery.steps import Delivery, received_header
from delivery_kit import BODY, envelope, settings_for

SCAN_UNAVAILABLE = "451 4.3.0 Message scan unavailable, try again later"


def run(tmp_path, sink, webhook_url, env=None, **options):
    """Deliver one message through the webhook step; returns (reply, env, settings)."""
    if "remotes" not in options:
        options["remotes"] = sink.url()
    settings = settings_for(tmp_path, webhook_url=webhook_url, **options)
    delivery = Delivery(settings)
    env = env or envelope()
    try:
        return delivery.deliver(env, BODY), env, settings
    finally:
        delivery.close()


def test_4_2_request_body_and_headers(tmp_path, sink, webhook):
    env = envelope(rcpts=["b@example.org", "c@example.org"], user="app1", tls=("TLSv1.3", "X"),
                   peer="10.1.2.3")
    reply, env, settings = run(tmp_path, sink, webhook.url, env=env)
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    (request,) = webhook.requests
    forwarded = received_header(settings, env) + BODY
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Smtprelay-Id"] == env.id
    assert "X-Smtprelay-Signature" not in request.headers
    body = request.json
    assert base64.b64decode(body.pop("message")) == forwarded
    assert body == {"id": env.id, "peer": "10.1.2.3", "helo": "printer.lan", "username": "app1",
                    "tls": True, "from": "app@example.com", "to": ["b@example.org", "c@example.org"],
                    "size": len(forwarded),
                    "received_at": env.received_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert sink.box[0].content == forwarded


def test_4_2_hmac_signature_header(tmp_path, sink, webhook):
    run(tmp_path, sink, webhook.url, webhook_secret="k3y")
    (request,) = webhook.requests
    expected = hmac.new(b"k3y", request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Smtprelay-Signature"] == "sha256=" + expected


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_4_2_local_scanner_bypasses_http_proxy(tmp_path, sink, webhook, monkeypatch, host):
    """An http_proxy set for the outside world must not break a scanner on this machine."""
    dead_proxy = "http://127.0.0.1:%d" % free_port()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    reply, env, _ = run(tmp_path, sink, webhook.url.replace("127.0.0.1", host))
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    assert len(webhook.requests) == 1


def test_4_2_called_once_with_every_recipient(tmp_path, webhook, sink_factory):
    one, two = sink_factory(), sink_factory()
    remotes = "%s %s" % (one.url(query="recipient=.*@one.test"),
                         two.url(query="recipient=.*@two.test"))
    env = envelope(rcpts=["a@one.test", "b@two.test"])
    reply, _, _ = run(tmp_path, None, webhook.url, env=env, remotes=remotes)
    assert reply.code == 250
    assert len(webhook.requests) == 1
    assert webhook.requests[0].json["to"] == ["a@one.test", "b@two.test"]


@pytest.mark.parametrize("status,answer", [
    (200, None), (204, None), (200, {"action": "accept"}), (200, b"  \r\n"),
], ids=["empty-200", "empty-204", "accept", "whitespace"])
def test_4_2_accept_goes_on(tmp_path, sink, webhook, status, answer):
    webhook.script = lambda request: (status, answer, 0)
    reply, env, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    assert len(sink.box) == 1


def test_4_2_accept_with_message_replaces_it(tmp_path, sink, webhook):
    replaced = b"X-Scanned: yes\nSubject: test\n\nclean body\n"
    webhook.script = lambda request: (
        200, {"action": "accept", "message": base64.b64encode(replaced).decode()}, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert reply.code == 250
    # Forwarded with CRLF line ends whatever the scanner wrote (SPEC 3.3).
    assert sink.box[0].content == replaced.replace(b"\n", b"\r\n")


def test_4_2_replace_is_a_synonym_of_accept_with_message(tmp_path, sink, webhook):
    replaced = b"X-Disclaimer: yes\r\nSubject: test\r\n\r\nbody\r\n"
    webhook.script = lambda request: (
        200, {"action": "replace", "message": base64.b64encode(replaced).decode()}, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert reply.code == 250
    assert sink.box[0].content == replaced


@pytest.mark.parametrize("answer,reason", [
    ({"action": "defer", "reason": "busy"}, "scanner: busy"),
    ({"action": "replace"}, "replace without a message"),
    ({"action": "deliver"}, 'unknown action "deliver" (valid: accept, replace, reject, discard, tempfail, '
                            'defer)'),
], ids=["defer", "replace-without-message", "unknown-action"])
def test_4_2_defer_and_malformed_answers_are_451_with_the_reason_logged(tmp_path, sink, webhook, relay_log,
                                                                         answer, reason):
    webhook.script = lambda request: (200, answer, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == SCAN_UNAVAILABLE
    assert sink.box == []
    warned = [r.fields["reason"] for r in relay_log.records if r.getMessage() == "webhook failed"]
    assert warned == [reason]


def test_4_2_reject_uses_code_and_reason(tmp_path, sink, webhook):
    webhook.script = lambda request: (200, {"action": "reject", "code": 550, "reason": "Virus found"}, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == "550 5.7.1 Virus found"
    assert sink.box == []


@pytest.mark.parametrize("answer,line", [
    ({"action": "reject", "code": 554, "reason": "Spam"}, "554 5.7.1 Spam"),
    ({"action": "reject", "code": 450, "reason": "Spam"}, "550 5.7.1 Spam"),
    ({"action": "reject", "code": 250, "reason": "Spam"}, "550 5.7.1 Spam"),
    ({"action": "reject", "code": "nope", "reason": "Spam"}, "550 5.7.1 Spam"),
    ({"action": "reject"}, "550 5.7.1 Message rejected"),
    ({"action": "reject", "code": 550, "reason": "5.7.0 Policy\r\nX"}, "550 5.7.0 Policy  X"),
], ids=["554", "4xx-becomes-550", "2xx-becomes-550", "junk-code", "defaults", "own-enhanced-code"])
def test_4_2_reject_code_outside_5xx_becomes_550(tmp_path, sink, webhook, answer, line):
    webhook.script = lambda request: (200, answer, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == line
    assert sink.box == []


def test_4_2_discard_answers_250_and_forwards_nothing(tmp_path, sink, webhook):
    webhook.script = lambda request: (200, {"action": "discard"}, 0)
    reply, env, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    assert sink.box == []


@pytest.mark.parametrize("status,answer", [
    (200, {"action": "tempfail", "reason": "busy"}),
    (500, {"action": "accept"}),
    (404, None),
    (302, None),
    (200, b"{not json"),
    (200, b"[1, 2]"),
    (200, {"action": "deliver"}),
    (200, {}),
    (200, {"action": "accept", "message": "***not base64***"}),
    (200, {"action": "accept", "message": 42}),
], ids=["tempfail", "http-500", "http-404", "redirect", "bad-json", "not-object", "unknown-action",
        "no-action", "bad-base64", "message-not-string"])
def test_4_2_broken_or_tempfail_answer_is_451(tmp_path, sink, webhook, status, answer):
    webhook.script = lambda request: (status, answer, 0)
    reply, _, _ = run(tmp_path, sink, webhook.url)
    assert str(reply) == SCAN_UNAVAILABLE
    assert sink.box == []


def test_4_2_refused_connection_is_451(tmp_path, sink):
    reply, _, _ = run(tmp_path, sink, "http://127.0.0.1:%d/scan" % free_port())
    assert str(reply) == SCAN_UNAVAILABLE
    assert sink.box == []


def test_4_2_slow_scanner_times_out_with_451(tmp_path, sink, webhook):
    webhook.script = lambda request: (200, {"action": "accept"}, 2)
    started = time.monotonic()
    reply, _, _ = run(tmp_path, sink, webhook.url, webhook_timeout="300ms")
    assert str(reply) == SCAN_UNAVAILABLE
    assert time.monotonic() - started < 1.5
    assert sink.box == []


def test_4_2_webhook_timeout_bounds_the_whole_call(tmp_path, sink):
    # One byte every 0.2 s: no single read waits long, the whole answer would take 40 s.
    trickle = Trickle(gap=0.2)
    try:
        started = time.monotonic()
        reply, _, _ = run(tmp_path, sink, trickle.url, webhook_timeout="700ms")
        elapsed = time.monotonic() - started
    finally:
        trickle.stop()
    assert str(reply) == SCAN_UNAVAILABLE
    assert elapsed < 2
    assert sink.box == []


def test_4_2_scanner_sees_aliased_recipients(tmp_path, sink, webhook):
    aliases = tmp_path / "aliases"
    aliases.write_text("b@example.org real@example.net\n")
    reply, _, _ = run(tmp_path, sink, webhook.url, aliases_file=str(aliases))
    assert reply.code == 250
    assert webhook.requests[0].json["to"] == ["real@example.net"]


@pytest.fixture
def https_webhook(webhook_factory, certs):
    return webhook_factory(certs.server_context())


def test_4_2_https_webhook_verified_against_the_trust_store(tmp_path, sink, https_webhook, certs,
                                                            monkeypatch):
    reply, _, _ = run(tmp_path, sink, https_webhook.url)
    assert str(reply) == SCAN_UNAVAILABLE  # the test CA is not trusted yet
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca_path)
    reply, _, _ = run(tmp_path, sink, https_webhook.url)
    assert reply.code == 250
    assert len(https_webhook.requests) == 1 and len(sink.box) == 1


# -- the example scanner of the README, run for real -------------------------------

@pytest.fixture
def readme_scanner(tmp_path):
    """The README's example scanner.py, started as a process with a secret."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (code,) = re.findall(r"```python\n(# scanner\.py.*?)```", readme, re.S)
    script = tmp_path / "scanner.py"
    script.write_text(code, encoding="utf-8")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, SCAN_SECRET="s3cret", SCAN_PORT=str(port)))
    try:
        assert wait_until(lambda: proc.poll() is not None or accepts_connections(port)), "scanner did not start"
        assert proc.poll() is None, proc.stderr.read()
        yield "http://127.0.0.1:%d/scan" % port
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_4_2_readme_example_scanner_through_the_relay(relay_factory, readme_scanner):
    relay = relay_factory(webhook_url=readme_scanner, webhook_secret="s3cret")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.sendmail("app@example.com", ["b@example.org"], b"Subject: clean\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("app@example.com", ["b@example.org"],
                            b"Subject: eicar\r\n\r\nX5O EICAR-STANDARD-ANTIVIRUS-TEST-FILE!\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (554, b"5.7.1 Virus found")
    (meta, message), = outbox_messages(relay.outbox)
    assert message.startswith(b"X-Scanned: clean\r\nReceived: from ")
    assert message.endswith(b"Subject: clean\r\n\r\nhello\r\n")


def test_4_2_readme_example_scanner_refuses_a_wrong_signature(relay_factory, readme_scanner):
    relay = relay_factory(webhook_url=readme_scanner, webhook_secret="not-the-secret")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            client.sendmail("app@example.com", ["b@example.org"], b"Subject: x\r\n\r\nhello\r\n")
    assert (deferred.value.smtp_code, deferred.value.smtp_error) == (
        451, b"4.3.0 Message scan unavailable, try again later")
    assert outbox_messages(relay.outbox) == []
