"""SPEC 9, the spool, in fallback mode: real relay, real downstreams, real files."""

import json
import os
import re
import sys

from conftest import wait_until
from relay_lib import metrics
from relay_lib.spool import queue as spool
from spool_kit import (MESSAGE, arrived, bounces, files, late_sink, queue_empty,  # noqa: F401
                       report_fields, send, spool_relay)


def queued_id(code, text):
    assert code == 250, (code, text)
    words = text.decode().split()
    assert words[:2] == ["2.0.0", "OK"] and words[3:] == ["queued"], text
    return words[2]


def test_9_replies_downstream_down_is_250_queued_then_exactly_once_after_flush(
        spool_relay, late_sink, relay_log):
    down = late_sink()
    relay = spool_relay(remotes=down.url(), queue_retry_min="1h", queue_retry_max="1h")
    ids = [queued_id(*send(relay, ["b@example.org"], MESSAGE)) for _ in range(3)]
    assert files(relay.spool_dir) == sorted(i + ext for i in ids for ext in (".eml", ".json"))
    state = json.load(open(os.path.join(relay.spool_dir, "queue", ids[0] + ".json")))
    assert [(p["dest"], p["rcpt"], p["state"]) for p in state["pairs"]] == [
        ("smtp://127.0.0.1:%d" % down.port, "b@example.org", "pending")]
    sink = down.up()
    print(spool.request_flush(relay.settings))
    assert wait_until(lambda: queue_empty(relay), 5), files(relay.spool_dir)
    assert sorted(m.content.split(b" id ")[1][:len(ids[0])].decode() for m in sink.box) == sorted(ids)
    messages = [r.getMessage() for r in relay_log.records]
    assert messages.count("queued") == 3 and messages.count("delivered") == 3
    queued = [r for r in relay_log.records if r.getMessage() == "queued"][0]
    assert "ConnectionRefusedError" in queued.fields["reason"]


def test_9_retries_deliver_after_queue_retry_min_without_a_flush(spool_relay, late_sink, relay_log):
    down = late_sink()
    relay = spool_relay(remotes=down.url())
    queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert wait_until(lambda: sum(r.getMessage() == "retry" for r in relay_log.records) >= 2)
    sink = down.up()
    assert wait_until(lambda: queue_empty(relay))
    assert len(sink.box) == 1 and sink.box[0].rcpt_tos == ["b@example.org"]
    retry = [r for r in relay_log.records if r.getMessage() == "retry"][-1]
    assert retry.fields["result"] == "ok" and retry.fields["attempt"] >= 3


def test_9_fanout_the_remote_that_accepted_never_gets_it_twice(spool_relay, sink_factory, late_sink,
                                                                 relay_log):
    up, down = sink_factory(), late_sink()
    relay = spool_relay(remotes="%s %s" % (down.url(), up.url()))
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert wait_until(lambda: sum(r.getMessage() == "retry" for r in relay_log.records) >= 3)
    assert len(up.box) == 1
    later = down.up()
    assert wait_until(lambda: queue_empty(relay))
    assert len(up.box) == 1 and len(later.box) == 1
    assert message_id.encode() in later.box[0].content


def test_9_replies_permanent_refusal_with_nothing_delivered_is_the_5xx_and_not_queued(
        spool_relay, sink):
    sink.handler.mail_reply = "550 5.7.1 sender blocked"
    relay = spool_relay(remotes=sink.url())
    code, text = send(relay, ["b@example.org"], MESSAGE)
    assert (code, text) == (550, b"5.7.1 127.0.0.1: sender blocked")
    assert files(relay.spool_dir) == [] and files(relay.spool_dir, "failed") == []
    assert bounces(sink.box) == []


def test_9_replies_partial_refusal_is_250_and_the_refused_recipient_bounced(spool_relay, sink):
    sink.handler.rcpt_reply = {"bad@example.org": "550 5.1.1 no such user"}
    relay = spool_relay(remotes=sink.url())
    code, text = send(relay, ["b@example.org", "bad@example.org"], MESSAGE)
    assert code == 250 and re.fullmatch(r"2\.0\.0 OK \w+", text.decode()), text
    assert arrived(sink, 1)[0].rcpt_tos == ["b@example.org"]
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    [dsn] = bounces(sink.box)
    assert dsn["From"] == "MAILER-DAEMON@relay.test" and dsn["To"] == "app@example.com"
    message, [rcpt] = report_fields(dsn)
    assert message["Reporting-MTA"] == "dns; relay.test"
    assert rcpt["Final-Recipient"] == "rfc822; bad@example.org"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert "no such user" in rcpt["Diagnostic-Code"]
    assert [m.rcpt_tos for m in sink.box if m.mail_from == "<>"] == [["app@example.com"]]


def test_9_pairs_recipient_refused_for_now_stays_pending_and_is_retried(spool_relay, sink):
    """A remote that takes one recipient and answers 4xx for another: the
    second is owed, never counted as delivered, and goes out on the retry."""
    sink.handler.rcpt_reply = {"later@example.org": "451 4.2.1 Mailbox busy"}
    relay = spool_relay(remotes=sink.url(), queue_retry_min="1h", queue_retry_max="1h")
    message_id = queued_id(*send(relay, ["b@example.org", "later@example.org"], MESSAGE))
    state = json.load(open(os.path.join(relay.spool_dir, "queue", message_id + ".json")))
    assert [(p["rcpt"], p["state"]) for p in state["pairs"]] == [
        ("b@example.org", "delivered"), ("later@example.org", "pending")]
    sink.handler.rcpt_reply = {}
    spool.request_flush(relay.settings)
    assert wait_until(lambda: queue_empty(relay), 5), files(relay.spool_dir)
    assert [m.rcpt_tos for m in sink.box] == [["b@example.org"], ["later@example.org"]]


def test_9_retries_permanent_refusal_on_retry_bounces_and_moves_to_failed(spool_relay, sink, relay_log):
    sink.handler.rcpt_reply = {"b@example.org": "451 4.2.0 greylisted"}
    relay = spool_relay(remotes=sink.url())
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    sink.handler.rcpt_reply = {"b@example.org": "550 5.1.1 gone"}
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    assert files(relay.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"]
    _, [rcpt] = report_fields(bounces(sink.box)[0])
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; b@example.org", "failed", "5.1.1")
    assert any(r.getMessage() == "bounced" and r.fields["id"] == message_id for r in relay_log.records)


def expiring_relay(spool_relay, sink, down):
    """The recipient's remote is down; the sender's domain goes to `sink`."""
    remotes = "%s %s" % (down.url(r"recipient=.*@example\.org"), sink.url() + r"?recipient=.*@example\.com")
    return spool_relay(remotes=remotes, queue_lifetime="300ms", queue_retry_min="50ms")


def test_9_retries_expiry_bounces_with_4_4_7_and_moves_to_failed(spool_relay, sink, late_sink, relay_log):
    relay = expiring_relay(spool_relay, sink, late_sink())
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    assert files(relay.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"]
    _, [rcpt] = report_fields(bounces(sink.box)[0])
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; b@example.org", "failed", "4.4.7")
    headers = list(bounces(sink.box)[0].iter_parts())[2].get_content()
    assert "Subject: spool" in headers and "Hello." not in headers
    assert any(r.getMessage() == "expired" and r.fields["id"] == message_id for r in relay_log.records)


def test_9_retries_null_sender_is_never_bounced(spool_relay, sink, late_sink, relay_log):
    relay = expiring_relay(spool_relay, sink, late_sink())
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE, sender=""))
    assert wait_until(lambda: files(relay.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"])
    assert wait_until(lambda: any(r.getMessage() == "refused for good, no bounce" for r in relay_log.records))
    assert sink.box == [] and relay.spool.queued == 0


def test_9_metrics_queued_messages_and_the_queue_gauges(spool_relay, late_sink):
    def sample(name):
        found = re.search(r"^%s (\S+)$" % re.escape(name), metrics.REGISTRY.render(), re.M)
        return float(found.group(1))

    before = sample('smtprelay_messages_total{result="queued"}')
    relay = spool_relay(remotes=late_sink().url(), queue_retry_min="1h", queue_retry_max="1h")
    queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert sample('smtprelay_messages_total{result="queued"}') == before + 1
    assert sample("smtprelay_queue_messages") == 1
    assert sample("smtprelay_queue_bytes") == sum(
        os.path.getsize(os.path.join(relay.spool_dir, "queue", n)) for n in files(relay.spool_dir))
    assert sample("smtprelay_queue_oldest_age_seconds") < 60
    relay.stop()
    assert sample("smtprelay_queue_messages") == 0


def test_9_pairs_two_remotes_to_one_host_are_two_destinations(spool_relay, late_sink):
    down = late_sink()
    remotes = "%s %s" % (down.url(r"recipient=a@.*"), down.url(r"recipient=b@.*"))
    relay = spool_relay(remotes=remotes, queue_retry_min="1h", queue_retry_max="1h")
    message_id = queued_id(*send(relay, ["a@example.org", "b@example.org"], MESSAGE))
    state = json.load(open(os.path.join(relay.spool_dir, "queue", message_id + ".json")))
    name = "smtp://127.0.0.1:%d" % down.port
    assert [(p["dest"], p["rcpt"]) for p in state["pairs"]] == [
        (name, "a@example.org"), (name + "#2", "b@example.org")]
    later = down.up()
    print(spool.request_flush(relay.settings))
    assert wait_until(lambda: queue_empty(relay))
    assert sorted(m.rcpt_tos for m in later.box) == [["a@example.org"], ["b@example.org"]]


def test_9_pairs_a_failover_group_is_one_destination(spool_relay, late_sink):
    first, second = late_sink(), late_sink()
    relay = spool_relay(remotes="%s %s" % (first.url("failover=out"), second.url("failover=out")),
                        queue_retry_min="1h", queue_retry_max="1h", failover_skip="1h")
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    state = json.load(open(os.path.join(relay.spool_dir, "queue", message_id + ".json")))
    assert [(p["dest"], p["state"]) for p in state["pairs"]] == [("out", "pending")]
    backup = second.up()  # the primary stays down and skipped: the group still takes it
    print(spool.request_flush(relay.settings))
    assert wait_until(lambda: queue_empty(relay))
    assert [m.rcpt_tos for m in backup.box] == [["b@example.org"]]


def test_9_retries_command_exit_75_is_queued_and_run_again(spool_relay, tmp_path):
    script = tmp_path / "archive.py"
    script.write_text("import os, sys\n"
                      "marker = sys.argv[1]\n"
                      "if not os.path.exists(marker):\n"
                      "    open(marker, 'w').close()\n"
                      "    sys.exit(75)\n"
                      "open(marker + '.got', 'wb').write(sys.stdin.buffer.read())\n")
    marker = tmp_path / "ran-once"
    relay = spool_relay(remotes="", command="%s %s %s" % (sys.executable, script, marker))
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert wait_until(lambda: queue_empty(relay))
    got = (tmp_path / "ran-once.got").read_bytes()
    assert got.endswith(MESSAGE) and message_id.encode() in got
