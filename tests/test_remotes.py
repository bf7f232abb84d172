"""SPEC 5: remote URLs, routing and sending, against real aiosmtpd downstreams.

Delivery.deliver is driven directly with a real SMTP server on loopback; the
end-to-end path through the relay is in test_delivery_e2e.py.
"""

import base64
import threading
import time

import pytest
from conftest import free_port, make_ca_and_leaf
from delivery_kit import BODY, deliver_once, envelope, ipv6_loopback_works, settings_for

from relay_lib.delivery.steps import Delivery, received_header

PASSWORD = "s3cr:t@p w"
PASSWORD_URL = "s3cr%3At%40p%20w"


@pytest.fixture
def trust_test_ca(certs, monkeypatch):
    """Make the test CA the system trust store (OpenSSL honours SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def assert_forwarded_over_tls(tmp_path, d, url):
    """One message through remote `url` reaches the downstream `d` over TLS."""
    reply, _ = deliver_once(tmp_path, remotes=url)
    assert reply.code == 250
    assert d.box[0].tls


def assert_not_forwarded(tmp_path, d, url):
    """One message through remote `url` gets 451 and never reaches the downstream `d`."""
    before = len(d.box)
    reply, _ = deliver_once(tmp_path, remotes=url)
    assert str(reply) == "451 4.4.1 Forwarding failed, try again later"
    assert len(d.box) == before


# -- 5.1 schemes and parameters ----------------------------------------------

def test_5_3_smtp_plain_forwards_bytes_exactly_plus_one_received_header(tmp_path, sink_factory):
    d = sink_factory()
    settings = settings_for(tmp_path, remotes=d.url())
    delivery = Delivery(settings)
    env = envelope()
    try:
        reply = delivery.deliver(env, BODY)
    finally:
        delivery.close()
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    (got,) = d.box
    assert got.content == received_header(settings, env) + BODY
    assert got.content.count(b"Received:") == 1
    assert got.mail_from == "app@example.com" and got.rcpt_tos == ["b@example.org"]
    assert "SIZE=%d" % len(got.content) in got.mail_options
    assert got.helo == "relay.test"  # SPEC 5.3: EHLO name = hostname
    assert not got.tls


def test_5_1_smtp_upgrades_with_starttls_when_offered(tmp_path, sink_factory, trust_test_ca):
    d = sink_factory("starttls")
    assert_forwarded_over_tls(tmp_path, d, d.url("smtp"))


def test_5_1_smtp_starttls_with_untrusted_certificate_is_451(tmp_path, sink_factory):
    d = sink_factory("starttls")
    assert_not_forwarded(tmp_path, d, d.url("smtp"))


@pytest.mark.parametrize("scheme,mode,query", [
    ("smtp", "starttls", "skipVerify"),
    ("starttls", "starttls", "skipVerify=true"),
    ("tls", "tls", "skipVerify"),
    ("smtps", "tls", "skipverify=true"),
], ids=["smtp", "starttls", "tls", "smtps"])
def test_5_1_skipverify_accepts_an_untrusted_certificate(tmp_path, sink_factory, scheme, mode, query):
    d = sink_factory(mode)
    assert_forwarded_over_tls(tmp_path, d, d.url(scheme, query=query))


def test_5_1_starttls_scheme_fails_when_starttls_not_offered(tmp_path, sink_factory):
    d = sink_factory("plain")
    assert_not_forwarded(tmp_path, d, d.url("starttls"))


@pytest.mark.parametrize("scheme,mode", [("starttls", "starttls"), ("tls", "tls"), ("smtps", "tls")])
def test_5_1_tls_schemes_verify_against_the_trust_store(tmp_path, sink_factory, trust_test_ca,
                                                        scheme, mode):
    d = sink_factory(mode)
    assert_forwarded_over_tls(tmp_path, d, d.url(scheme))


@pytest.mark.parametrize("scheme,mode", [("tls", "tls"), ("starttls", "starttls")])
def test_5_1_tls_schemes_without_trust_fail_451(tmp_path, sink_factory, scheme, mode):
    d = sink_factory(mode)
    assert_not_forwarded(tmp_path, d, d.url(scheme))


def test_5_1_host_name_is_verified(tmp_path, sink_factory, certs, monkeypatch):
    ca, cert, key = make_ca_and_leaf(str(tmp_path), ["wrong.test"])
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the chain is trusted, only the name is wrong
    d = sink_factory("tls", context=certs.server_context(cert, key))
    assert_not_forwarded(tmp_path, d, d.url("tls"))
    reply, _ = deliver_once(tmp_path, remotes=d.url("tls", query="skipVerify"))
    assert reply.code == 250


@pytest.mark.parametrize("mode,scheme", [("plain", "smtp"), ("starttls", "starttls"), ("tls", "tls")])
def test_5_1_auth_plain_is_the_default_with_percent_decoded_password(tmp_path, sink_factory,
                                                                     trust_test_ca, mode, scheme):
    d = sink_factory(mode, auth={"app1": PASSWORD})
    reply, _ = deliver_once(tmp_path, remotes=d.url(scheme, userinfo="app1:" + PASSWORD_URL))
    assert reply.code == 250
    assert d.handler.mechanisms == ["PLAIN"]
    assert d.box[0].login == b"app1"


@pytest.mark.parametrize("mode,scheme", [("plain", "smtp"), ("tls", "smtps")])
def test_5_1_auth_login_when_asked(tmp_path, sink_factory, trust_test_ca, mode, scheme):
    d = sink_factory(mode, auth={"app1": PASSWORD})
    reply, _ = deliver_once(tmp_path, remotes=d.url(scheme, userinfo="app1:" + PASSWORD_URL,
                                                    query="auth=login"))
    assert reply.code == 250
    assert d.handler.mechanisms == ["LOGIN"]
    assert d.box[0].login == b"app1"


def _non_loopback_address():
    """This machine's own non-loopback IPv4 address, or None (no packet is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.skipif(_non_loopback_address() is None, reason="no non-loopback interface")
def test_5_1_no_password_in_the_clear_over_a_network(tmp_path, sink_factory):
    d = sink_factory(auth={"app1": PASSWORD}, host=_non_loopback_address())
    assert_not_forwarded(tmp_path, d, d.url(userinfo="app1:" + PASSWORD_URL))
    assert d.handler.mechanisms == [] and d.box == []


@pytest.mark.parametrize("query", ["", "auth=login"], ids=["plain", "login"])
def test_4_1_remote_auth_failure_is_451_not_535(tmp_path, sink_factory, query):
    d = sink_factory(auth={"app1": PASSWORD})
    assert_not_forwarded(tmp_path, d, d.url(userinfo="app1:wrong", query=query))


def test_5_1_sender_path_replaces_the_envelope_sender(tmp_path, sink_factory):
    d = sink_factory()
    reply, _ = deliver_once(tmp_path, remotes=d.url(path="bounce@example.com"))
    assert reply.code == 250
    assert d.box[0].mail_from == "bounce@example.com"


def test_5_1_null_sender_is_forwarded(tmp_path, sink_factory):
    d = sink_factory()
    reply, _ = deliver_once(tmp_path, env=envelope(mail_from=""), remotes=d.url())
    assert reply.code == 250
    assert d.box[0].mail_from == "<>"  # how aiosmtpd reports MAIL FROM:<>


@pytest.mark.skipif(not ipv6_loopback_works(), reason="this machine has no IPv6 loopback")
def test_5_1_ipv6_host_in_brackets(tmp_path, sink_factory):
    d = sink_factory(host="::1")
    reply, _ = deliver_once(tmp_path, remotes=d.url())
    assert d.url().startswith("smtp://[::1]:")
    assert reply.code == 250
    assert d.box[0].peer[0] == "::1"


def test_5_3_client_certificate_from_remote_certificate(tmp_path, sink_factory, certs, trust_test_ca):
    d = sink_factory("tls", context=certs.server_context(client_ca=certs.ca_path))
    reply, _ = deliver_once(tmp_path, remotes=d.url("tls"), remote_certificate=certs.client_cert_path,
                            remote_key=certs.client_key_path)
    assert reply.code == 250
    assert_not_forwarded(tmp_path, d, d.url("tls"))
    assert len(d.box) == 1


# -- 5.2 routing --------------------------------------------------------------

def test_5_2_two_recipients_two_remotes(tmp_path, sink_factory):
    one, two = sink_factory(), sink_factory()
    remotes = "%s %s" % (one.url(query="recipient=.*@one%5C.test"),
                         two.url(query="recipient=.*@TWO.test"))
    env = envelope(rcpts=["a@one.test", "b@two.test"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=remotes)
    assert reply.code == 250
    assert [m.rcpt_tos for m in one.box] == [["a@one.test"]]
    assert [m.rcpt_tos for m in two.box] == [["b@two.test"]]


def test_5_2_recipient_filter_is_a_full_match(tmp_path, sink_factory):
    one, catch_all = sink_factory(), sink_factory()
    remotes = "%s %s" % (one.url(query="recipient=one.test"), catch_all.url())
    env = envelope(rcpts=["x@one.test"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=remotes)
    assert reply.code == 250
    assert one.box == []  # "one.test" only matches part of the address
    assert catch_all.box[0].rcpt_tos == ["x@one.test"]


def test_5_2_remote_without_filter_gets_every_recipient(tmp_path, sink_factory):
    d = sink_factory()
    env = envelope(rcpts=["a@one.test", "b@two.test"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=d.url())
    assert reply.code == 250
    assert d.box[0].rcpt_tos == ["a@one.test", "b@two.test"]  # one transaction


def test_5_2_strict_sender_uses_only_the_matching_remote(tmp_path, sink_factory):
    a, b = sink_factory(), sink_factory()
    remotes = "%s %s" % (a.url(path="a@example.com"), b.url(path="b@example.com"))
    reply, _ = deliver_once(tmp_path, env=envelope(mail_from="b@example.com"), remotes=remotes,
                            strict_sender="true")
    assert reply.code == 250
    assert a.box == [] and b.box[0].mail_from == "b@example.com"


def test_5_2_without_strict_sender_every_remote_takes_part(tmp_path, sink_factory):
    a, b = sink_factory(), sink_factory()
    remotes = "%s %s" % (a.url(path="a@example.com"), b.url(path="b@example.com"))
    reply, _ = deliver_once(tmp_path, env=envelope(mail_from="b@example.com"), remotes=remotes)
    assert reply.code == 250
    assert a.box[0].mail_from == "a@example.com" and b.box[0].mail_from == "b@example.com"


def test_5_2_recipient_no_remote_admits_is_never_dropped(tmp_path, sink_factory):
    d = sink_factory()
    env = envelope(rcpts=["a@one.test", "z@elsewhere.test"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=d.url(query="recipient=.*@one.test"))
    assert str(reply) == "550 5.7.1 No remote routes this recipient"
    assert d.box == []


# -- 5.3 failures and their replies (4.1) -------------------------------------

def test_4_1_remote_refusing_the_connection_is_451(tmp_path):
    reply, _ = deliver_once(tmp_path, remotes="smtp://127.0.0.1:%d" % free_port())
    assert str(reply) == "451 4.4.1 Forwarding failed, try again later"


@pytest.mark.parametrize("remote_says,client_gets", [
    ("452 4.3.1 Insufficient system storage", "451 4.4.1 Forwarding failed, try again later"),
    ("554 5.6.0 Content rejected", "554 5.6.0 127.0.0.1: Content rejected"),
    ("550-5.7.1 Message refused\r\n550 5.7.1 see https://example.com/why",
     "550 5.7.1 127.0.0.1: Message refused see https://example.com/why"),
    ("552 Too much mail", "552 5.0.0 127.0.0.1: Too much mail"),
], ids=["4xx-is-451", "5xx-passed-through", "multiline-5xx-on-one-line", "5xx-without-enhanced-code"])
def test_4_1_remote_reply_after_data(tmp_path, sink_factory, remote_says, client_gets):
    d = sink_factory()
    d.handler.data_reply = remote_says
    reply, _ = deliver_once(tmp_path, remotes=d.url())
    assert str(reply) == client_gets
    assert d.box == []


def test_5_3_non_ascii_addresses_use_smtputf8(tmp_path, sink_factory):
    d = sink_factory()
    env = envelope(mail_from="j\u00fcrgen@example.com", rcpts=["b\u00e9@example.org"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=d.url())
    assert reply.code == 250
    assert "SMTPUTF8" in d.box[0].mail_options
    assert d.box[0].rcpt_tos == ["b\u00e9@example.org"]


def test_5_3_non_ascii_addresses_to_a_remote_without_smtputf8_fail_permanently(tmp_path, mini):
    m = mini()
    env = envelope(mail_from="j\u00fcrgen@example.com")
    reply, _ = deliver_once(tmp_path, env=env, remotes=m.url())
    assert str(reply) == "553 5.6.7 127.0.0.1: remote does not support SMTPUTF8"
    assert m.messages == []


def test_4_1_remote_dropping_the_connection_mid_transaction_is_451(tmp_path, mini):
    m = mini(drop_in_data=True)
    reply, _ = deliver_once(tmp_path, remotes=m.url())
    assert str(reply) == "451 4.4.1 Forwarding failed, try again later"
    assert m.messages == []


@pytest.mark.parametrize("greeting,line", [
    (b"554 5.7.1 You are not welcome", "451 4.4.1 Forwarding failed, try again later"),
    (b"450 4.7.1 Not now", "451 4.4.1 Forwarding failed, try again later"),
], ids=["554", "450"])
def test_4_1_remote_refusing_at_greeting_is_451(tmp_path, mini, greeting, line):
    """A refused greeting refuses the connection, not the message: 451, never a bounce.
    (A 421 greeting is a throttle: see test_13_throttle_at_the_greeting_past_remote_wait.)"""
    m = mini(greeting=greeting)
    reply, _ = deliver_once(tmp_path, remotes=m.url())
    assert str(reply) == line


def test_5_3_failed_connection_is_not_reused(tmp_path, sink_factory):
    d = sink_factory()
    d.handler.data_reply = "554 5.6.0 Content rejected"
    delivery = Delivery(settings_for(tmp_path, remotes=d.url()))
    try:
        assert delivery.deliver(envelope(), BODY).code == 554
        assert delivery.dispatcher.idle_count(delivery.settings.remotes[0]) == 0
        d.handler.data_reply = None
        assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert len(d.handler.connections) == 2


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_5_3_partial_recipient_refusal_fails_the_message(tmp_path, sink_factory, pipelining):
    d = sink_factory(pipelining=pipelining)
    d.handler.rcpt_reply["c@example.org"] = "550 5.1.1 No such user"
    env = envelope(rcpts=["b@example.org", "c@example.org"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=d.url())
    assert str(reply) == "550 5.1.1 127.0.0.1: No such user"
    assert d.box == []


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_5_3_recipient_4xx_is_451(tmp_path, sink_factory, pipelining):
    d = sink_factory(pipelining=pipelining)
    d.handler.rcpt_reply["b@example.org"] = "450 4.2.0 Mailbox busy"
    assert_not_forwarded(tmp_path, d, d.url())


@pytest.mark.parametrize("pipelining", [False, True], ids=["serial", "pipelined"])
def test_5_3_sender_5xx_is_passed_through(tmp_path, sink_factory, pipelining):
    d = sink_factory(pipelining=pipelining)
    d.handler.mail_reply = "553 5.7.1 Sender not welcome"
    reply, _ = deliver_once(tmp_path, remotes=d.url())
    assert str(reply) == "553 5.7.1 127.0.0.1: Sender not welcome"
    assert d.box == []


def test_4_1_slow_remote_times_out_with_451(tmp_path, sink_factory):
    d = sink_factory()
    d.handler.delay = 3
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=d.url(), remote_timeout="500ms")
    assert str(reply) == "451 4.4.1 Forwarding failed, try again later"
    assert time.monotonic() - started < 2.5


def test_5_3_remotes_tried_in_order_first_failure_decides(tmp_path, sink_factory):
    bad, good = sink_factory(), sink_factory()
    bad.handler.data_reply = "550 5.7.1 Nope"
    reply, _ = deliver_once(tmp_path, remotes="%s %s" % (bad.url(), good.url()))
    assert str(reply) == "550 5.7.1 127.0.0.1: Nope"
    assert good.box == []
    reply, _ = deliver_once(tmp_path, remotes="%s %s" % (good.url(), bad.url()))
    assert str(reply) == "550 5.7.1 127.0.0.1: Nope"
    assert len(good.box) == 1  # may be delivered twice on retry, never lost


# -- 5.3 connection pool and pipelining -------------------------------------

def test_5_3_pool_reuses_one_connection_for_several_messages(tmp_path, sink_factory):
    d = sink_factory(auth={"app1": PASSWORD})
    delivery = Delivery(settings_for(tmp_path, remotes=d.url(userinfo="app1:" + PASSWORD_URL)))
    try:
        for _ in range(3):
            assert delivery.deliver(envelope(), BODY).code == 250
        assert delivery.dispatcher.idle_count(delivery.settings.remotes[0]) == 1
    finally:
        delivery.close()
    assert len({m.peer for m in d.box}) == 1
    assert d.handler.mechanisms == ["PLAIN"]  # authenticated once


@pytest.mark.parametrize("scheme,mode", [("tls", "tls"), ("starttls", "starttls")])
def test_5_3_pool_reuses_tls_connections(tmp_path, sink_factory, trust_test_ca, scheme, mode):
    d = sink_factory(mode, pipelining=True)
    delivery = Delivery(settings_for(tmp_path, remotes=d.url(scheme)))
    try:
        for _ in range(3):
            assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert len({m.peer for m in d.box}) == 1 and all(m.tls for m in d.box)


def test_5_3_pool_size_zero_opens_a_connection_per_message(tmp_path, sink_factory):
    d = sink_factory()
    delivery = Delivery(settings_for(tmp_path, remotes=d.url(), remote_pool_size="0"))
    try:
        for _ in range(2):
            assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert len({m.peer for m in d.box}) == 2


def test_5_3_pool_recovers_when_the_remote_restarted(tmp_path, sink_factory):
    d = sink_factory()
    delivery = Delivery(settings_for(tmp_path, remotes=d.url()))
    try:
        assert delivery.deliver(envelope(), BODY).code == 250
        d.stop()  # the pooled connection is now closed by the remote
        again = sink_factory(port=d.port)
        assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert len(again.box) == 1


def test_5_3_pool_retries_when_the_pooled_connection_dies_on_reuse(tmp_path, mini):
    m = mini(die_on_reuse=True)
    delivery = Delivery(settings_for(tmp_path, remotes=m.url()))
    try:
        for _ in range(3):
            assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert [number for number, _ in m.messages] == [1, 2, 2]
    assert m.connections == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
def test_5_3_pool_retries_when_the_remote_closes_an_old_connection_with_421(tmp_path, mini,
                                                                             pipelining):
    m = mini(pipelining=pipelining, messages_per_connection=2)
    delivery = Delivery(settings_for(tmp_path, remotes=m.url()))
    try:
        for _ in range(5):
            assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert [number for number, _ in m.messages] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("pipelining", [True, False], ids=["advertised", "not-advertised"])
def test_5_3_transaction_is_pipelined_only_when_advertised(tmp_path, mini, pipelining):
    m = mini(pipelining=pipelining)
    delivery = Delivery(settings_for(tmp_path, remotes=m.url()))
    env = envelope(rcpts=["b@example.org", "c@example.org"])
    try:
        assert delivery.deliver(env, BODY).code == 250
        assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert m.pipelined == [pipelining, pipelining]
    # MiniSMTP keeps the wire form: dot-stuffed [R5321 4.5.2], CRLF line ends.
    wire = received_header(delivery.settings, env) + BODY.replace(b"\r\n.", b"\r\n..")
    assert m.messages[0][1] == wire
    assert m.connections == 1


def test_5_3_pool_closes_connections_idle_past_remote_pool_idle(tmp_path, sink_factory):
    d = sink_factory()
    delivery = Delivery(settings_for(tmp_path, remotes=d.url(), remote_pool_idle="200ms"))
    remote = delivery.settings.remotes[0]
    try:
        assert delivery.deliver(envelope(), BODY).code == 250
        assert delivery.dispatcher.idle_count(remote) == 1
        deadline = time.monotonic() + 3
        while delivery.dispatcher.idle_count(remote) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert delivery.dispatcher.idle_count(remote) == 0
    finally:
        delivery.close()


def test_5_3_concurrent_messages_share_a_bounded_pool(tmp_path, sink_factory):
    d = sink_factory(pipelining=True)
    delivery = Delivery(settings_for(tmp_path, remotes=d.url(), remote_pool_size="2"))
    results = []

    def send():
        for _ in range(5):
            results.append(delivery.deliver(envelope(), BODY).code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == [250] * 20
        assert delivery.dispatcher.idle_count(delivery.settings.remotes[0]) <= 2
    finally:
        delivery.close()
    assert len(d.box) == 20


# -- no secrets in the log ----------------------------------------------------

def test_5_1_password_never_logged_at_any_level(tmp_path, sink_factory, relay_log):
    caplog = relay_log
    good = sink_factory(auth={"app1": PASSWORD})
    bad = sink_factory(auth={"app1": "other"})
    for url in (good.url(userinfo="app1:" + PASSWORD_URL),
                good.url(userinfo="app1:" + PASSWORD_URL, query="auth=login"),
                bad.url(userinfo="app1:" + PASSWORD_URL),
                "smtp://app1:%s@127.0.0.1:%d" % (PASSWORD_URL, free_port())):
        deliver_once(tmp_path, remotes=url)
    # Only the relay's own records: aiosmtpd's debug log of the downstream is not ours.
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records
                     if r.name.startswith("smtprelay"))
    assert "app1:***@127.0.0.1" in text
    for secret in (PASSWORD, PASSWORD_URL, base64.b64encode(PASSWORD.encode()).decode(),
                   base64.b64encode(b"\0app1\0" + PASSWORD.encode()).decode()):
        assert secret not in text
