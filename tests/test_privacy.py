"""SPEC 3.3 and 6: what must never leak. A Bcc recipient is named in no copy
of the message; a password a client sends out of step in AUTH is never logged,
not even at trace level."""

import base64
import smtplib

import pytest

from conftest import outbox_messages
from smtp_talk import Talk, write_users

PASSWORD = "Tr0ub4dor&3-horse"
SECRETS = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
           base64.b64encode(PASSWORD.encode()).decode().upper(),
           base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()]
MESSAGE = b"From: app@example.com\r\nTo: a@one.test\r\nSubject: minutes\r\n\r\nbody\r\n"


def b64(text):
    return base64.b64encode(text.encode()).decode()


# -- 3.3: the Received header never shows a Bcc recipient -------------------------

def test_3_3_bcc_recipient_is_visible_in_no_copy(relay_factory, sink_factory):
    """One remote takes both recipients, another only the Bcc one: no copy
    downstream names `hidden@`, neither in the Received header nor elsewhere."""
    both, hidden_only = sink_factory(), sink_factory()
    relay = relay_factory(remotes="%s %s" % (both.url(), hidden_only.url(query="recipient=hidden@.*")))
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        assert client.sendmail("app@example.com", ["a@one.test", "hidden@two.test"], MESSAGE) == {}
    copies = both.box + hidden_only.box
    assert [c.rcpt_tos for c in copies] == [["a@one.test", "hidden@two.test"], ["hidden@two.test"]]
    for copy in copies:
        assert copy.content.startswith(b"Received: from ")
        assert b"hidden@" not in copy.content and b"for <" not in copy.content


def test_3_3_single_recipient_is_named_in_the_received_header(relay):
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.sendmail("app@example.com", ["a@one.test"], MESSAGE)
    (_, message), = outbox_messages(relay.outbox)
    assert b"\r\n\tfor <a@one.test>; " in message.split(b"\r\n\r\n")[0]


# -- 6: a password sent out of step never reaches the log ---------------------------

@pytest.fixture
def auth_relay(relay_factory, certs, tmp_path):
    users = write_users(tmp_path / "users", {"alice": ("right-password", None)})
    return relay_factory(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                         local_key=certs.key_path, allowed_users=users)


def tls_talk(relay, certs):
    t = Talk(relay.port, ehlo="client.test")
    assert t.cmd("STARTTLS").startswith("220 ")
    t.starttls(certs.client_context())
    assert "AUTH PLAIN LOGIN" in t.cmd("EHLO client.test")
    return t


def assert_no_secret_logged(records):
    text = "\n".join("%s %r" % (r.getMessage(), getattr(r, "fields", {})) for r in records)
    assert records and "command" in text  # trace level was on: the dialogue is there
    for secret in SECRETS:
        assert secret not in text


def refused_lengths(records):
    return [r.fields["length"] for r in records if "length" in getattr(r, "fields", {})]


def test_6_password_after_refused_login_username_is_not_logged(auth_relay, certs, relay_log):
    with tls_talk(auth_relay, certs) as t:
        assert t.cmd("AUTH LOGIN").startswith("334 ")
        assert t.cmd("alice@example.com").startswith("501 5.5.2 ")  # not base64: refused
        assert t.cmd(b64(PASSWORD)) == "500 5.5.2 Command unrecognized"
        assert t.cmd("QUIT").startswith("221 ")
    assert_no_secret_logged(relay_log.records)
    assert refused_lengths(relay_log.records) == [len(b64(PASSWORD))]


def test_6_password_after_cancelled_login_is_not_logged(auth_relay, certs, relay_log):
    with tls_talk(auth_relay, certs) as t:
        assert t.cmd("AUTH LOGIN " + b64("alice")).startswith("334 ")
        assert t.cmd("*") == "501 5.5.2 Authentication cancelled"
        assert t.cmd(b64(PASSWORD)) == "500 5.5.2 Command unrecognized"
        assert t.cmd(PASSWORD) == "500 5.5.2 Command unrecognized"
        assert t.cmd("QUIT").startswith("221 ")
    assert_no_secret_logged(relay_log.records)
    assert refused_lengths(relay_log.records) == [len(b64(PASSWORD)), len(PASSWORD)]


def test_6_credentials_sent_before_starttls_are_not_logged(auth_relay, relay_log):
    with Talk(auth_relay.port, ehlo="client.test") as t:
        assert t.cmd("AUTH PLAIN " + SECRETS[3]).startswith("538 5.7.11 ")
        assert t.cmd("AUTH LOGIN").startswith("538 5.7.11 ")
        assert t.cmd(b64("alice")) == "500 5.5.2 Command unrecognized"
        assert t.cmd(b64(PASSWORD)) == "500 5.5.2 Command unrecognized"
    assert_no_secret_logged(relay_log.records)


def test_6_pipelined_credentials_are_not_logged(auth_relay, relay_log):
    """A client that pipelines AUTH LOGIN with both answers, before STARTTLS."""
    with Talk(auth_relay.port, ehlo="client.test") as t:
        t.send(("AUTH LOGIN\r\n%s\r\n%s\r\nEXPN staff\r\nQUIT\r\n" % (b64("alice"), b64(PASSWORD))).encode())
        assert [r[:3] for r in t.replies(5)] == ["538", "500", "500", "500", "221"]
    assert_no_secret_logged(relay_log.records)
    # A verb the relay knows of but does not implement is named; a password never.
    named = [r.fields.get("verb") for r in relay_log.records if "length" in getattr(r, "fields", {})]
    assert named == [None, None, "EXPN"]
