"""SPEC 14: client limits. One looping device may not hold every session
slot or spend the upstream's allowance for everyone: per-address sessions,
per-client message and recipient rates, the AUTH user as the client, the
PROXY header's address behind a load balancer, exemptions, one warning a
minute. A second client address (127.0.0.2) proves the others go on."""

import logging

import pytest

from conftest import wait_until, write_ini
from relay_lib import metrics
from relay_lib.config import settings as config
from smtp_talk import Talk
from test_auth_cache import PASSWORD, auth_relay, plain, users  # noqa: F401 (fixtures)
from test_proxy import v1

OTHER = "127.0.0.2"


def session(relay, source=None, ehlo=True):
    t = Talk(relay.port, source=source)
    t.__enter__()
    assert t.reply().startswith("220 ")
    if ehlo:
        assert t.cmd("EHLO client.test").startswith("250")
    return t


def message(t, rcpts=("b@example.org",)):
    """One transaction; the replies to MAIL, each RCPT and the final dot (or None)."""
    answers = [t.cmd("MAIL FROM:<a@example.com>")]
    if not answers[0].startswith("250"):
        return answers
    answers += [t.cmd("RCPT TO:<%s>" % rcpt) for rcpt in rcpts]
    if not all(a.startswith("250") for a in answers[1:]):
        t.cmd("RSET")
        return answers
    assert t.cmd("DATA").startswith("354")
    answers.append(t.cmd("Subject: x\r\n\r\nbody\r\n."))
    return answers


def refusals(limit):
    return metrics.CLIENT_REFUSALS.labels(limit).value()


def test_14_client_max_connections_refuses_the_next_session_from_that_address(relay_factory):
    relay = relay_factory(client_max_connections="2")
    held = [session(relay, ehlo=False) for _ in range(2)]
    before = refusals("connections")
    with Talk(relay.port) as third:
        assert third.reply() == "421 4.7.0 Too many connections from 127.0.0.1"
    assert refusals("connections") == before + 1
    with Talk(relay.port, source=OTHER) as other:
        assert other.reply().startswith("220 ")  # another address is served
    held.pop().__exit__(None, None, None)
    assert wait_until(lambda: relay.active_sessions == 1)  # only the one still held
    with Talk(relay.port) as again:
        assert again.reply().startswith("220 ")  # its slot came back
    for t in held:
        t.__exit__(None, None, None)


def test_14_client_message_rate_refuses_mail_with_450_naming_the_limit(relay_factory):
    relay = relay_factory(client_message_rate="2/h")
    t = session(relay)
    assert message(t)[-1].startswith("250 2.0.0 OK")
    assert message(t)[-1].startswith("250 2.0.0 OK")
    assert message(t) == ["450 4.7.1 Too many messages from you (client_message_rate 2/h), try again later"]
    t.__exit__(None, None, None)
    other = session(relay, source=OTHER)
    assert message(other)[-1].startswith("250 2.0.0 OK")  # another client keeps its own allowance
    other.__exit__(None, None, None)


def test_14_client_recipient_rate_refuses_rcpt_with_450(relay_factory):
    relay = relay_factory(client_recipient_rate="3/h")
    t = session(relay)
    assert message(t, ("a@example.org", "b@example.org"))[-1].startswith("250 2.0.0 OK")
    answers = message(t, ("c@example.org", "d@example.org"))
    assert answers[:2] == ["250 2.1.0 OK", "250 2.1.5 OK"]
    assert answers[2] == "450 4.7.1 Too many recipients from you (client_recipient_rate 3/h), try again later"
    t.__exit__(None, None, None)


def test_14_only_accepted_messages_count(relay_factory, sink_factory):
    refusing = sink_factory()
    refusing.handler.data_reply = "554 5.6.0 Content rejected"
    relay = relay_factory(client_message_rate="1/h", remotes=refusing.url())
    t = session(relay)
    for _ in range(3):  # refused by the remote: none of them costs the client anything
        assert message(t)[-1].startswith("554 5.6.0")
    t.__exit__(None, None, None)
    accepting = relay_factory(client_message_rate="1/h")
    t = session(accepting)
    assert message(t)[-1].startswith("250")
    assert message(t)[0].startswith("450 4.7.1")
    t.__exit__(None, None, None)


def test_14_an_authenticated_user_is_the_client(auth_relay, certs):
    relay = auth_relay(client_message_rate="1/h")

    def as_user(user):
        t = session(relay)
        assert t.cmd("STARTTLS").startswith("220 ")
        t.starttls(certs.client_context())
        assert t.cmd("EHLO client.test").startswith("250")
        assert t.cmd(plain(user, PASSWORD)).startswith("235 ")
        return t

    alice = as_user("alice")
    assert message(alice)[-1].startswith("250 2.0.0 OK")
    assert message(alice)[0].startswith("450 4.7.1")
    alice.__exit__(None, None, None)
    bob = as_user("bob")  # the same address, another user: another allowance
    assert message(bob)[-1].startswith("250 2.0.0 OK")
    bob.__exit__(None, None, None)


def test_14_behind_a_load_balancer_the_proxy_header_names_the_client(relay_factory):
    relay = relay_factory(proxy_nets="127.0.0.0/8", allowed_nets="192.0.2.0/24", client_max_connections="1")
    first = Talk(relay.port)
    first.__enter__()
    first.send(v1("192.0.2.10"))
    assert first.reply().startswith("220 ")
    with Talk(relay.port) as second:
        second.send(v1("192.0.2.10"))
        assert second.reply() == "421 4.7.0 Too many connections from 192.0.2.10"
    with Talk(relay.port) as third:
        third.send(v1("192.0.2.11"))
        assert third.reply().startswith("220 ")  # the balancer's own address holds nothing
    first.__exit__(None, None, None)


def test_14_exempt_networks_have_no_limits(relay_factory):
    relay = relay_factory(client_message_rate="1/h", client_max_connections="1",
                          client_limits_exempt="127.0.0.0/30")
    held = session(relay)
    t = session(relay)
    for _ in range(3):
        assert message(t)[-1].startswith("250 2.0.0 OK")
    for s in (held, t):
        s.__exit__(None, None, None)


def test_14_one_warning_per_client_and_limit_a_minute(relay_factory, relay_log):
    relay = relay_factory(client_message_rate="1/h")
    before = refusals("messages")
    t = session(relay)
    assert message(t)[-1].startswith("250")
    for _ in range(5):
        assert message(t)[0].startswith("450 4.7.1")
    t.__exit__(None, None, None)
    warned = [r for r in relay_log.records if r.getMessage() == "client limit reached"]
    assert len(warned) == 1 and r_fields(warned[0]) == {"client": "127.0.0.1", "limit": "client_message_rate"}
    assert refusals("messages") == before + 5
    assert not [r for r in relay_log.records if r.getMessage() == "refused" and r.levelno == logging.WARNING]


def r_fields(record):
    return {k: record.fields[k] for k in ("client", "limit")}


@pytest.mark.parametrize("option, value", [
    ("client_message_rate", "10"), ("client_message_rate", "10/w"), ("client_message_rate", "0/m"),
    ("client_recipient_rate", "-5/m"), ("client_recipient_rate", "many/m"),
    ("client_max_connections", "-1"), ("client_max_connections", "lots"),
    ("client_limits_exempt", "10.0.0.0/33"),
], ids=["no-unit", "other-unit", "zero", "negative", "not-numeric", "negative-connections",
        "text-connections", "bad-cidr"])
def test_14_bad_values_are_a_config_error_naming_the_option(tmp_path, option, value):
    ini = tmp_path / "relay.ini"
    write_ini(ini, {"listen": "127.0.0.1:0", "remotes": "file:outbox", option: value})
    with pytest.raises(config.ConfigError) as err:
        config.from_file(str(ini))
    line = str(err.value)
    assert option in line and "\n" not in line
