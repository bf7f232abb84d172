"""SPEC 13 at run time: the relay against a simulated Microsoft 365 or Gmail
(`upstream_sim`): connection caps, waiting for room, rates, throttle
feedback, quota pauses, failover members without room, the queue hand-off
and counts across a restart."""

import logging
import os
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import wait_until
from spool_kit import spool_relay  # noqa: F401 (a fixture)
from upstream_sim import UpstreamSim

MESSAGE = b"Subject: limits\r\n\r\nbody\r\n"


@pytest.fixture
def upstream():
    made = []

    def factory(**options):
        made.append(UpstreamSim(**options).start())
        return made[-1]

    yield factory
    for up in made:
        up.stop()


def send(relay, rcpts=("b@example.org",), count=1):
    """Send `count` messages on one connection; the reply (code, text) of each."""
    answers = []
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=60)
    try:
        for _ in range(count):
            try:
                client.sendmail("a@example.com", list(rcpts), MESSAGE)
                answers.append((250, b""))
            except smtplib.SMTPResponseException as exc:
                answers.append((exc.smtp_code, exc.smtp_error))
                client.rset()
    finally:
        try:
            client.quit()
        except smtplib.SMTPException:
            client.close()  # a relay shutting down answers QUIT with 421
    return answers


def burst(relay, clients, each):
    with ThreadPoolExecutor(clients) as pool:
        return [a for answers in pool.map(lambda _: send(relay, count=each), range(clients)) for a in answers]


def warnings(caplog, message):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == message]


def test_13_connections_cap_holds_and_every_client_waits_for_250(relay_factory, upstream):
    up = upstream(max_connections=3, refuse_at="mail", hold=0.05)
    relay = relay_factory(remotes=up.url("connections=3"))
    answers = burst(relay, clients=12, each=3)
    assert answers == [(250, b"")] * 36
    assert len(up.messages) == 36
    assert up.max_seen <= 3 and up.refusals == []


def test_13_pool_keeps_no_more_than_the_connection_limit(relay_factory, upstream):
    up = upstream()
    relay = relay_factory(remotes=up.url("connections=2"), remote_pool_size="10")
    assert burst(relay, clients=6, each=2) == [(250, b"")] * 12
    assert up.max_seen <= 2
    assert wait_until(lambda: up.open_now <= 2)
    assert relay.delivery.dispatcher.idle_count(relay.settings.remotes[0]) <= 2


def test_13_wait_that_runs_out_is_451_4_4_5_naming_remote_and_limit(relay_factory, upstream):
    up = upstream(hold=2.0)
    relay = relay_factory(remotes=up.url("connections=1"), remote_wait="300ms")
    first = threading.Thread(target=send, args=(relay,))
    first.start()
    try:
        assert up.wait_for(lambda: up.open_now == 1)
        [(code, text)] = send(relay)
    finally:
        first.join(10)
    assert code == 451
    assert text.startswith(b"4.4.5 smtp://127.0.0.1:%d has no room (connections=1)" % up.port)
    assert len(up.messages) == 1 and up.max_seen == 1


def test_13_rate_lets_a_burst_through_then_paces_the_rest(relay_factory, upstream):
    up = upstream()
    relay = relay_factory(remotes=up.url("rate=2/s"))
    assert send(relay, count=4) == [(250, b"")] * 4
    times = up.accepted_times
    assert times[1] - times[0] < 0.4  # the burst of 2 goes at once
    assert times[2] - times[0] >= 0.4 and times[3] - times[2] >= 0.4  # then 2 a second
    assert up.refusals == []


def test_13_recipients_rate_counts_each_recipient(relay_factory, upstream):
    up = upstream()
    relay = relay_factory(remotes=up.url("recipients=2/h"), remote_wait="200ms")
    assert send(relay, rcpts=("a@example.org", "b@example.org")) == [(250, b"")]
    [(code, text)] = send(relay, rcpts=("c@example.org",))
    assert code == 451 and b"recipients=2/h" in text
    assert len(up.messages) == 1


def test_13_throttle_reply_is_absorbed_lowers_the_limit_and_warns_once(relay_factory, upstream, relay_log):
    up = upstream(max_connections=2, refuse_at="mail", hold=0.05)
    relay = relay_factory(remotes=up.url(), remote_wait="20s")
    answers = burst(relay, clients=8, each=2)
    assert answers == [(250, b"")] * 16
    assert len(up.messages) == 16
    assert up.refusals and all(reply.startswith("432 4.3.2") for _, reply in up.refusals)
    throttled = warnings(relay_log, "remote throttled")
    assert len(throttled) == 1  # one a minute per remote, never one per refusal
    assert throttled[0].fields["remote"] == up.url() and throttled[0].fields["connections"] < 8
    [(_, _, limit)] = relay.delivery.dispatcher.accounts.describe()
    assert limit <= 2


def test_13_throttle_at_the_greeting_is_absorbed_too(relay_factory, upstream):
    up = upstream(max_connections=1, refuse_at="greeting", hold=0.05)
    relay = relay_factory(remotes=up.url(), remote_wait="20s")
    assert burst(relay, clients=4, each=1) == [(250, b"")] * 4
    assert [stage for stage, _ in up.refusals] == ["greeting"] * len(up.refusals)


def test_13_gmail_style_421_rate_refusal_is_retried_after_a_pause(relay_factory, upstream):
    up = upstream(rate=(2, 1.0))
    relay = relay_factory(remotes=up.url(), remote_wait="20s")
    assert send(relay, count=4) == [(250, b"")] * 4
    assert any(reply.startswith("421 4.7.0") for _, reply in up.refusals)
    assert len(up.messages) == 4


def test_13_quota_reply_pauses_the_remote_without_a_spool(relay_factory, upstream, relay_log):
    up = upstream(quota=1)
    relay = relay_factory(remotes=up.url(), remote_quota_pause="1h")
    assert send(relay) == [(250, b"")]
    [(code, text)] = send(relay)
    assert code == 451 and text.startswith(b"4.4.5 127.0.0.1: STOREDRV.Submission.Exception:"
                                           b"SubmissionQuotaExceededException")
    connections = up.connections
    [(code, text)] = send(relay)  # paused: the remote gets nothing
    assert code == 451 and b"SubmissionQuotaExceeded" in text
    assert up.connections == connections and len(up.refusals) == 1
    [paused] = warnings(relay_log, "remote quota spent, paused")
    assert paused.fields["until"].endswith("Z")


def test_13_quota_reply_with_a_spool_queues_and_never_bounces(spool_relay, upstream):
    up = upstream(quota=1)
    relay = spool_relay(remotes=up.url(), remote_quota_pause="1h")
    assert send(relay) == [(250, b"")]
    [(code, text)] = send(relay)
    assert code == 250 and text == b""  # smtplib hides the text of a 250: check the queue
    assert wait_until(lambda: relay.spool.queued == 1)
    assert not [n for n in os.listdir(os.path.join(relay.spool_dir, "failed"))]


def test_13_queued_for_lack_of_room_goes_out_as_soon_as_there_is_room(spool_relay, upstream):
    up = upstream(hold=1.0)
    relay = spool_relay(remotes=up.url("connections=1"), remote_wait="100ms", queue_retry_min="1h",
                        queue_retry_max="2h")
    first = threading.Thread(target=send, args=(relay,))
    first.start()
    try:
        assert up.wait_for(lambda: up.open_now == 1)
        assert send(relay) == [(250, b"")]  # queued, not refused
    finally:
        first.join(10)
    # queue_retry_min is an hour: only "as soon as it has room" delivers it now.
    assert up.wait_for(lambda: len(up.messages) == 2, timeout=15)


def test_13_failover_passes_over_a_member_without_room(relay_factory, upstream):
    busy, spare = upstream(hold=2.0), upstream()
    remotes = "%s %s" % (busy.url("connections=1&failover=out"), spare.url("failover=out"))
    relay = relay_factory(remotes=remotes, remote_wait="10s")
    first = threading.Thread(target=send, args=(relay,))
    first.start()
    try:
        assert busy.wait_for(lambda: busy.open_now == 1)
        assert send(relay) == [(250, b"")]
        assert len(spare.messages) == 1  # sent while the busy member still held its message
    finally:
        first.join(10)
    assert len(busy.messages) == 1
    assert not relay.delivery.dispatcher.is_down(relay.settings.remotes[0])  # a limit is not a failure


def test_13_counts_survive_a_restart_with_a_spool(spool_relay, upstream, tmp_path):
    up = upstream()
    options = dict(remotes=up.url("rate=2/h"), remote_wait="100ms")
    relay = spool_relay(**options)
    assert send(relay, count=2) == [(250, b"")] * 2
    relay.stop()
    assert os.path.exists(os.path.join(relay.spool_dir, "limits.json"))
    again = spool_relay(**options)
    assert send(again) == [(250, b"")]  # queued: the rate was spent before the restart
    assert wait_until(lambda: again.spool.queued == 1)
    assert len(up.messages) == 2


def test_13_shutdown_ends_a_wait_as_if_it_ran_out(relay_factory, upstream):
    up = upstream(hold=3.0)
    relay = relay_factory(remotes=up.url("connections=1"), remote_wait="30s")
    first = threading.Thread(target=send, args=(relay,))
    first.start()
    answers = []
    second = threading.Thread(target=lambda: answers.extend(send(relay)))
    try:
        assert up.wait_for(lambda: up.open_now == 1)
        second.start()
        assert wait_until(lambda: "smtprelay_remote_waiting" in _waiting(relay))
        started = time.monotonic()
        relay.stop(timeout=10)
        assert time.monotonic() - started < 10  # the waiting message did not hold the stop for 30 s
    finally:
        first.join(10)
        second.join(10)
    assert answers and answers[0][0] == 451 and answers[0][1].startswith(b"4.4.5")


def _waiting(relay):
    from relay_lib import metrics
    text = metrics.REGISTRY.render()
    return "\n".join(line for line in text.splitlines()
                     if line.startswith("smtprelay_remote_waiting{") and not line.endswith(" 0"))


def test_13_metrics_show_open_connections_limit_throttles_and_waits(relay_factory, upstream):
    from relay_lib import metrics
    up = upstream(max_connections=1, refuse_at="mail", hold=0.05)
    relay = relay_factory(remotes=up.url("connections=2"), remote_wait="20s")
    assert burst(relay, clients=3, each=1) == [(250, b"")] * 3
    text = metrics.REGISTRY.render()
    label = 'remote="127.0.0.1:%d"' % up.port
    assert "smtprelay_remote_connection_limit{%s} 1" % label in text
    throttles = [line for line in text.splitlines() if line.startswith("smtprelay_remote_throttles_total{%s}" % label)]
    assert throttles and int(throttles[0].split()[-1]) >= 1
    assert "smtprelay_remote_wait_seconds_count{%s}" % label in text
    assert "smtprelay_remote_connections_open{%s}" % label in text


def test_13_throttle_at_the_greeting_past_remote_wait_is_451_4_4_5(tmp_path, mini):
    from delivery_kit import deliver_once
    m = mini(greeting=b"421 4.3.2 Service not available")
    reply, _ = deliver_once(tmp_path, remotes=m.url(), remote_wait="0s")
    assert str(reply).startswith("451 4.4.5 %s has no room (throttled: " % m.url())
    assert "421 4.3.2 Service not available" in str(reply)
