"""SPEC 11: failover groups, end to end: an smtplib client, the real relay,
real downstreams, dead ones (refused, blackholed) and scripted refusals."""

import socket
import time

import pytest

from conftest import free_port
from relay_lib.config import settings as config
from relay_lib.config.remotes import parse_remote
from relay_lib.delivery.routing import destinations
from test_delivery_e2e import send


def _records(caplog, message):
    return [r.fields for r in caplog.records if r.getMessage() == message]


def _failed_remotes(caplog):
    return [f["remote"] for f in _records(caplog, "remote failed")]


def _taken_by(caplog):
    """The `remote` field of each message's info line."""
    return [f["remote"] for f in _records(caplog, "message")]


def _group(*urls, name="mx"):
    return " ".join("%s%sfailover=%s" % (u, "&" if "?" in u else "?", name) for u in urls)


def _dead_url():
    return "smtp://127.0.0.1:%d" % free_port()


@pytest.fixture
def blackhole():
    """A listening socket that never accepts: connects succeed, no greeting ever comes."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield "smtp://127.0.0.1:%d" % sock.getsockname()[1]
    sock.close()


def test_11_group_is_one_destination_named_by_failover():
    one, two, single, same = (parse_remote(u) for u in (
        "smtp://a.test?failover=mx", "smtp://b.test?failover=mx", "smtp://c.test",
        "smtp://c.test?recipient=.*@c.test"))
    dests = destinations((one, single, two, same))
    assert [(d.name, d.members) for d in dests] == [
        ("mx", (one, two)), ("smtp://c.test:25", (single,)), ("smtp://c.test:25#2", (same,))]


def test_11_empty_failover_name_is_a_config_error():
    with pytest.raises(config.ConfigError, match="failover needs a group name"):
        config.load(flags={"remotes": "smtp://a.test?failover="}, environ={})


def test_11_refused_primary_fails_over_and_is_skipped(relay_factory, sink_factory, relay_log):
    backup = sink_factory()
    primary = _dead_url()
    relay = relay_factory(remotes=_group(primary, backup.url()))
    for _ in range(2):
        code, text = send(relay, ["b@one.test"])
        assert code == 250 and text.startswith(b"2.0.0 OK ")
    assert len(backup.box) == 2
    # Tried once, then skipped: the second message went straight to the backup.
    assert _failed_remotes(relay_log) == [primary]
    assert _taken_by(relay_log) == ["%s 451; %s 250 2.0.0 Queued as Q1" % (primary, backup.url()),
                                    "%s 250 2.0.0 Queued as Q2" % backup.url()]


def test_11_blackholed_primary_costs_one_timeout(relay_factory, sink_factory, relay_log, blackhole):
    backup = sink_factory()
    relay = relay_factory(remotes=_group(blackhole, backup.url()), remote_timeout="300ms")
    started = time.monotonic()
    assert send(relay, ["b@one.test"])[0] == 250
    assert time.monotonic() - started >= 0.3
    assert send(relay, ["b@one.test"])[0] == 250
    assert len(backup.box) == 2
    assert _failed_remotes(relay_log) == [blackhole]
    assert "timed out" in _records(relay_log, "remote failed")[0]["error"]


def test_11_primary_answering_421_fails_over_but_is_not_skipped(relay_factory, sink_factory, relay_log):
    primary, backup = sink_factory(), sink_factory()
    primary.handler.mail_reply = "421 4.3.0 Try again later"
    relay = relay_factory(remotes=_group(primary.url(), backup.url()))
    for _ in range(2):
        assert send(relay, ["b@one.test"])[0] == 250
    assert len(backup.box) == 2 and primary.box == []
    # A 4xx is no reason to skip: the primary was asked again for the second message.
    assert _failed_remotes(relay_log) == [primary.url(), primary.url()]


def test_11_primary_answering_550_is_the_answer(relay_factory, sink_factory, relay_log):
    primary, backup = sink_factory(), sink_factory()
    primary.handler.mail_reply = "550 5.7.1 Sender blocked"
    relay = relay_factory(remotes=_group(primary.url(), backup.url()))
    code, text = send(relay, ["b@one.test"])
    assert (code, text) == (550, b"5.7.1 127.0.0.1: Sender blocked")
    assert backup.box == [] and backup.handler.connections == set()
    assert _taken_by(relay_log) == ["%s 550" % primary.url()]


def test_11_primary_back_after_failover_skip(relay_factory, sink_factory, relay_log):
    port = free_port()
    backup = sink_factory()
    relay = relay_factory(remotes=_group("smtp://127.0.0.1:%d" % port, backup.url()),
                          failover_skip="1500ms")
    failed_at = time.monotonic()
    assert send(relay, ["b@one.test"])[0] == 250
    primary = sink_factory(port=port)
    sent = []  # (start time, box that got it)
    deadline = time.monotonic() + 6
    while not primary.box and time.monotonic() < deadline:
        before = len(backup.box)
        started = time.monotonic()
        assert send(relay, ["b@one.test"])[0] == 250
        sent.append((started, "backup" if len(backup.box) > before else "primary"))
        time.sleep(0.1)
    assert len(primary.box) == 1, "the primary never came back into use"
    assert sent[0][1] == "backup", "a skipped primary was used before failover_skip ran out"
    assert all(when >= failed_at + 1.5 for when, box in sent if box == "primary")
    assert sent[-1][1] == "primary"


def test_11_every_member_skipped_means_every_member_is_tried(relay_factory, sink_factory, relay_log):
    first, second = _dead_url(), free_port()
    second_url = "smtp://127.0.0.1:%d" % second
    relay = relay_factory(remotes=_group(first, second_url))
    code, text = send(relay, ["b@one.test"])
    assert (code, text) == (451, b"4.4.1 Forwarding failed, try again later")
    assert _failed_remotes(relay_log) == [first, second_url]
    back = sink_factory(port=second)  # both are now skipped; the second is back
    assert send(relay, ["b@one.test"])[0] == 250
    assert len(back.box) == 1
    assert _failed_remotes(relay_log) == [first, second_url, first]


def test_11_routing_applies_to_each_member(relay_factory, sink_factory):
    one, two = sink_factory(), sink_factory()
    relay = relay_factory(remotes=_group(one.url(query="recipient=.*@one.test"),
                                         two.url(query="recipient=.*@two.test")))
    assert send(relay, ["x@three.test"]) == (550, b"5.7.1 No remote routes this recipient")
    assert send(relay, ["a@one.test", "b@two.test"])[0] == 250
    assert [m.rcpt_tos for m in one.box] == [["a@one.test"]]
    assert [m.rcpt_tos for m in two.box] == [["b@two.test"]]


def test_11_groups_and_plain_remotes_fan_out(relay_factory, sink_factory):
    plain, member, other = sink_factory(), sink_factory(), sink_factory()
    relay = relay_factory(remotes="%s %s" % (plain.url(), _group(member.url(), other.url())))
    assert send(relay, ["b@one.test"])[0] == 250
    assert len(plain.box) == len(member.box) == 1 and other.box == []
