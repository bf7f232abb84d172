"""SPEC 4 and 5 end to end: an smtplib client, the real relay, real downstreams and webhook."""

import base64
import smtplib
import sys

import pytest

from conftest import free_port

MESSAGE = (b"From: app@example.com\r\nTo: b@one.test\r\nSubject: e2e\r\n\r\n"
           b"line one\r\n.dot line\r\n\xc3\xa9t\xc3\xa9\r\n\r\nlast line\r\n")


def send(relay, rcpts, message=MESSAGE, sender="app@example.com"):
    """One transaction; returns the (code, text) of DATA or of the first refusal."""
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return code, text
        return client.data(message)


def split_received(content):
    """(Received header, rest) of what a downstream got."""
    assert content.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    end = content.index(b"\r\n") + 2
    while content.startswith(b"\t", end):  # folded lines of the same header
        end = content.index(b"\r\n", end) + 2
    return content[:end], content[end:]


def test_5_3_e2e_downstream_gets_original_bytes_plus_one_received_header(relay_factory, sink_factory):
    d = sink_factory()
    relay = relay_factory(remotes=d.url())
    code, text = send(relay, ["b@one.test"])
    assert code == 250 and text.startswith(b"2.0.0 OK ")
    header, rest = split_received(d.box[0].content)
    assert rest == MESSAGE
    assert b"by relay.test (smtprelay) with ESMTP id %s" % text.split()[-1] in header
    assert d.box[0].content.count(b"\r\nReceived:") == 0


def test_5_2_e2e_two_recipients_two_remotes(relay_factory, sink_factory):
    one, two = sink_factory(), sink_factory()
    relay = relay_factory(remotes="%s %s" % (one.url(query="recipient=.*@one.test"),
                                             two.url(query="recipient=.*@two.test")))
    code, _ = send(relay, ["a@one.test", "b@two.test"])
    assert code == 250
    assert one.box[0].rcpt_tos == ["a@one.test"] and two.box[0].rcpt_tos == ["b@two.test"]
    assert split_received(one.box[0].content)[1] == MESSAGE == split_received(two.box[0].content)[1]


@pytest.mark.parametrize("command", ["", "%s -c \"import sys; sys.stdin.read()\"" % sys.executable],
                         ids=["remotes", "remotes-and-command"])
def test_5_2_e2e_recipient_no_remote_admits_is_refused_at_rcpt(relay_factory, sink_factory, command):
    d = sink_factory()
    relay = relay_factory(remotes=d.url(query="recipient=.*@one.test"), command=command)
    code, text = send(relay, ["x@elsewhere.test"])
    assert (code, text) == (550, b"5.7.1 No remote routes this recipient")


def test_5_2_e2e_strict_sender_refuses_at_rcpt_when_no_remote_has_this_sender(relay_factory,
                                                                              sink_factory):
    d = sink_factory()
    relay = relay_factory(remotes=d.url(path="app@example.com"), strict_sender="true")
    assert send(relay, ["b@one.test"], sender="other@example.com") == (
        550, b"5.7.1 No remote routes this recipient")
    assert send(relay, ["b@one.test"], sender="app@example.com")[0] == 250
    assert [m.mail_from for m in d.box] == ["app@example.com"]


def test_4_1_e2e_remote_5xx_reaches_the_client_with_the_remote_host(relay_factory, sink_factory):
    d = sink_factory()
    d.handler.data_reply = "554 5.6.0 Content rejected"
    relay = relay_factory(remotes=d.url())
    assert send(relay, ["b@one.test"]) == (554, b"5.6.0 127.0.0.1: Content rejected")


def test_4_1_e2e_remote_down_is_451(relay_factory):
    relay = relay_factory(remotes="smtp://127.0.0.1:%d" % free_port())
    assert send(relay, ["b@one.test"]) == (451, b"4.4.1 Forwarding failed, try again later")


def test_4_2_e2e_webhook_reject_and_replace(relay_factory, sink_factory, webhook):
    d = sink_factory()
    relay = relay_factory(remotes=d.url(), webhook_url=webhook.url, webhook_secret="k")
    webhook.script = lambda r: (200, {"action": "reject", "code": 550, "reason": "Virus found"}, 0)
    assert send(relay, ["b@one.test"]) == (550, b"5.7.1 Virus found")
    replaced = b"X-Scanned: clean\r\n\r\nnew body\r\n"
    webhook.script = lambda r: (200, {"action": "accept",
                                      "message": base64.b64encode(replaced).decode()}, 0)
    code, _ = send(relay, ["b@one.test"])
    assert code == 250
    assert [m.content for m in d.box] == [replaced]
    assert all(r.headers["X-Smtprelay-Signature"].startswith("sha256=") for r in webhook.requests)
    assert split_received(base64.b64decode(webhook.requests[0].json["message"]))[1] == MESSAGE


def test_4_2_e2e_webhook_down_is_451(relay_factory, sink_factory):
    d = sink_factory()
    relay = relay_factory(remotes=d.url(), webhook_url="http://127.0.0.1:%d/" % free_port())
    assert send(relay, ["b@one.test"]) == (451, b"4.3.0 Message scan unavailable, try again later")
    assert d.box == []


def test_4_e2e_alias_rewrites_recipient(relay_factory, sink_factory, tmp_path):
    d = sink_factory()
    (tmp_path / "aliases").write_text("sales@one.test alice@one.test\n")
    relay = relay_factory(remotes=d.url(query="recipient=alice@one.test"), aliases_file="aliases")
    code, _ = send(relay, ["Sales@one.test"])
    assert code == 250
    assert d.box[0].rcpt_tos == ["alice@one.test"]


def test_5_3_e2e_pool_carries_messages_from_several_clients_on_one_connection(
        relay_factory, sink_factory):
    d = sink_factory(auth={"app1": "pw"}, pipelining=True)
    relay = relay_factory(remotes=d.url(userinfo="app1:pw"))
    for _ in range(3):
        assert send(relay, ["b@one.test"])[0] == 250
    assert len(d.box) == 3
    assert len({m.peer for m in d.box}) == 1
    assert d.handler.mechanisms == ["PLAIN"]
