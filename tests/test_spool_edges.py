"""SPEC 9 at its edges: bounces whatever the addresses and replies hold, the
size limit after -delete, a configuration that changed while messages were
queued, a crash in the middle of a retry. Real relay, real downstreams, real
files."""

import base64
import email
import email.policy
import os
import re
import smtplib
import sys

import pytest

from conftest import outbox_messages, wait_until
from relay_lib.spool import queue as spool
from spool_kit import (MESSAGE, bounces, files, late_sink, queue_empty, report_fields, send,  # noqa: F401
                       spool_relay)
from test_spool import queued_id


def test_9_replies_partial_refusal_with_a_non_ascii_reply_is_250_and_bounced(spool_relay, sink):
    """A 5xx whose text is not ASCII (a German server) must not turn the 250
    into a 451: the client would send again to those who have it."""
    sink.handler.rcpt_reply = {"bad@example.org": "550 5.1.1 Empfänger unbekannt"}
    relay = spool_relay(remotes=sink.url())
    code, text = send(relay, ["b@example.org", "bad@example.org"], MESSAGE)
    assert code == 250 and re.fullmatch(r"2\.0\.0 OK \w+", text.decode()), text
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    assert [m.rcpt_tos for m in sink.box if m.mail_from != "<>"] == [["b@example.org"]]
    _, [rcpt] = report_fields(bounces(sink.box)[0])
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; bad@example.org", "failed", "5.1.1")
    assert "Empfänger unbekannt" in rcpt["Diagnostic-Code"]


def send_utf8(relay, rcpt):
    """One SMTPUTF8 transaction to `rcpt`; returns the (code, text) of DATA."""
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("app@example.com", ["SMTPUTF8"])[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        return client.data(MESSAGE)


def test_9_retries_permanent_refusal_of_a_utf8_recipient_is_bounced(spool_relay, sink, relay_log):
    rcpt = "jürgen@exämple.org"
    sink.handler.rcpt_reply = {rcpt: "451 4.2.0 greylisted"}
    relay = spool_relay(remotes=sink.url())
    message_id = queued_id(*send_utf8(relay, rcpt))
    sink.handler.rcpt_reply = {rcpt: "550 5.1.1 gone"}
    assert wait_until(lambda: bounces(sink.box))
    assert files(relay.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"]
    _, [block] = report_fields(bounces(sink.box)[0])
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; " + rcpt, "5.1.1")
    assert not [r for r in relay_log.records if r.getMessage() == "queue attempt failed"]


def test_9_spool_max_size_space_freed_by_delete_takes_new_messages_at_once(spool_relay, late_sink):
    big = MESSAGE + b"x" * 1500 + b"\r\n"
    relay = spool_relay(remotes=late_sink().url(), spool_max_size="3000", queue_retry_min="1h",
                        queue_retry_max="1h")
    first = queued_id(*send(relay, ["b@example.org"], big))
    assert spool.delete(relay.settings, first)[0] == 0
    second = queued_id(*send(relay, ["b@example.org"], big))
    assert files(relay.spool_dir) == [second + ".eml", second + ".json"]
    queue = os.path.join(relay.spool_dir, "queue")
    on_disk = sum(os.path.getsize(os.path.join(queue, name)) for name in files(relay.spool_dir))
    assert relay.spool.stats()[:2] == (1, on_disk)


def test_9_spool_max_size_a_message_failing_for_good_makes_room_for_its_bounce(spool_relay, sink):
    big = MESSAGE + b"x" * 1500 + b"\r\n"
    sink.handler.rcpt_reply = {"b@example.org": "451 4.2.0 greylisted"}
    relay = spool_relay(remotes=sink.url(), spool_max_size="3000")
    message_id = queued_id(*send(relay, ["b@example.org"], big))
    sink.handler.rcpt_reply = {"b@example.org": "550 5.1.1 gone"}
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    assert files(relay.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"]
    _, [block] = report_fields(bounces(sink.box)[0])
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; b@example.org", "5.1.1")


def test_9_retries_a_command_removed_from_the_config_expires_and_bounces(
        spool_relay, sink, tmp_path, relay_log):
    """Like a remote that is no longer configured, a command step left to do
    is a temporary failure: the message expires and is bounced, instead of
    failing each attempt with an exception and staying queued for ever."""
    script = tmp_path / "busy.py"
    script.write_text("import sys\nsys.exit(75)\n")
    options = dict(remotes=sink.url(), queue_retry_min="1h", queue_retry_max="1h")
    first = spool_relay(command="%s %s" % (sys.executable, script), **options)
    message_id = queued_id(*send(first, ["b@example.org"], MESSAGE))
    first.stop()
    options.update(queue_retry_min="50ms", queue_retry_max="100ms", queue_lifetime="300ms")
    again = spool_relay(**options)
    assert wait_until(lambda: bounces(sink.box) and queue_empty(again))
    assert files(again.spool_dir, "failed") == [message_id + ".eml", message_id + ".json"]
    _, [block] = report_fields(bounces(sink.box)[0])
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; b@example.org", "4.4.7")
    assert [m for m in sink.box if m.mail_from != "<>"] == []
    assert not [r for r in relay_log.records if r.getMessage() == "queue attempt failed"]


def test_9_restart_a_file_remote_write_cut_short_by_a_crash_is_done_on_the_retry(spool_relay, tmp_path):
    """A retry reuses the message id, so it meets the temporary file a crash
    left in the file: remote's folder: at least once, never zero times."""
    outbox = tmp_path / "box"
    outbox.write_bytes(b"")  # a file where the folder should be: the first write fails
    relay = spool_relay(remotes="file:" + str(outbox), queue_retry_min="1h", queue_retry_max="1h")
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    outbox.unlink()
    outbox.mkdir()
    (outbox / (".tmp-" + message_id + ".eml")).write_bytes(b"Subject: half a mess")
    spool.request_flush(relay.settings)
    assert wait_until(lambda: queue_empty(relay))
    [(meta, message)] = outbox_messages(str(outbox))
    assert meta["id"] == message_id and message.endswith(MESSAGE)
    assert sorted(os.listdir(str(outbox))) == [message_id + ".eml", message_id + ".json"]


def test_9_restart_a_remote_fixed_between_runs_takes_what_was_queued_for_it(
        spool_relay, sink_factory, late_sink):
    """The usual fix of a queue that fills: the remote's port or scheme was
    wrong. The pending pairs follow the recipient's current route; the remote
    that accepted at the first attempt never gets the message again."""
    up, wrong = sink_factory(), late_sink()
    first = spool_relay(remotes="%s %s" % (up.url(), wrong.url()), queue_retry_min="1h",
                        queue_retry_max="1h")
    message_id = queued_id(*send(first, ["b@example.org"], MESSAGE))
    first.stop()
    fixed = sink_factory()
    again = spool_relay(remotes="%s %s" % (up.url(), fixed.url()))
    assert wait_until(lambda: queue_empty(again))
    assert [m.rcpt_tos for m in fixed.box] == [["b@example.org"]]
    assert message_id.encode() in fixed.box[0].content
    assert len(up.box) == 1


def test_9_restart_a_renamed_remote_that_has_the_message_never_gets_it_again(
        spool_relay, sink, late_sink, relay_log):
    """127.0.0.1 became localhost: the same remote under a new name. The
    recipient's pending pair must not follow the route there."""
    first = spool_relay(remotes="%s %s" % (sink.url(), late_sink().url()), queue_retry_min="1h",
                        queue_retry_max="1h")
    queued_id(*send(first, ["b@example.org"], MESSAGE))
    first.stop()
    again = spool_relay(remotes="smtp://localhost:%d" % sink.port)
    assert wait_until(lambda: sum(r.getMessage() == "retry" for r in relay_log.records) >= 2)
    assert len(sink.box) == 1 and again.spool.queued == 1


def test_9_retries_a_scanned_message_refused_for_good_goes_to_failed_as_the_scanner_gave_it(
        spool_relay, sink, webhook):
    """failed/ holds the state `scan done`: its message must be the scanner's."""
    webhook.script = lambda request: (503, None, 0)
    sink.handler.rcpt_reply = {"b@example.org": "550 5.1.1 gone"}
    relay = spool_relay(remotes=sink.url(), spool_mode="always", webhook_url=webhook.url)
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    scanned = b"X-Scanned: clean\r\n" + MESSAGE
    webhook.script = lambda request: (200, {"action": "accept",
                                            "message": base64.b64encode(scanned).decode()}, 0)
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    with open(os.path.join(relay.spool_dir, "failed", message_id + ".eml"), "rb") as f:
        assert f.read() == scanned


def test_9_retries_a_bounce_through_a_remote_with_a_sender_goes_out_with_that_sender(spool_relay, sink):
    """SPEC 5.1 before SPEC 9's null sender: a remote with a /sender (Microsoft
    365 takes only its own mailbox) gets every message with that sender, the
    bounce too; the relay still knows it for a bounce and never bounces it."""
    sink.handler.rcpt_reply = {"bad@example.org": "550 5.1.1 no such user"}
    relay = spool_relay(remotes=sink.url(path="relay@example.com"))
    assert send(relay, ["b@example.org", "bad@example.org"], MESSAGE)[0] == 250
    assert wait_until(lambda: len(sink.box) == 2 and queue_empty(relay))
    assert [m.mail_from for m in sink.box] == ["relay@example.com", "relay@example.com"]
    dsn = email.message_from_bytes(sink.box[1].content, policy=email.policy.default)
    assert dsn["From"] == "MAILER-DAEMON@relay.test"
    assert dsn.get_content_type() == "multipart/report"
