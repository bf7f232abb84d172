"""SPEC 9: spool_mode = always with the webhook, the -queue/-flush/-delete
commands and the spool options."""

import base64
import os
import subprocess

import pytest

from conftest import relay_command, wait_until
from relay_lib.config.settings import ConfigError, load
from spool_kit import MESSAGE, arrived, bounces, files, late_sink, queue_empty, send, spool_relay  # noqa: F401
from test_spool import queued_id


def test_9_always_mode_answers_before_the_remote_and_forwards_in_the_background(spool_relay, sink):
    sink.handler.delay = 0.5
    relay = spool_relay(remotes=sink.url(), spool_mode="always")
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert sink.box == []  # the reply came before the remote answered
    assert message_id.encode() in arrived(sink, 1)[0].content
    assert wait_until(lambda: queue_empty(relay))
    assert len(sink.box) == 1


def test_9_always_mode_webhook_reject_is_answered_and_never_queued(spool_relay, sink, webhook):
    webhook.script = lambda request: (200, {"action": "reject", "code": 554, "reason": "Virus found"}, 0)
    relay = spool_relay(remotes=sink.url(), spool_mode="always", webhook_url=webhook.url)
    assert send(relay, ["b@example.org"], MESSAGE) == (554, b"5.7.1 Virus found")
    assert files(relay.spool_dir) == [] and relay.spool.queued == 0
    assert sink.box == [] and len(webhook.requests) == 1


def test_9_always_mode_webhook_outage_is_queued_and_scanned_on_retry(spool_relay, sink, webhook):
    webhook.script = lambda request: (503, None, 0)
    relay = spool_relay(remotes=sink.url(), spool_mode="always", webhook_url=webhook.url)
    message_id = queued_id(*send(relay, ["b@example.org"], MESSAGE))
    assert wait_until(lambda: len(webhook.requests) >= 2)
    assert sink.box == []
    scanned = b"X-Scanned: clean\r\n" + MESSAGE
    webhook.script = lambda request: (200, {"action": "accept",
                                            "message": base64.b64encode(scanned).decode()}, 0)
    assert wait_until(lambda: queue_empty(relay))
    [got] = arrived(sink, 1)
    assert got.content == scanned  # the scanner's version, as it gave it
    assert webhook.requests[-1].json["id"] == message_id


def test_9_fallback_webhook_outage_queues_with_the_scan_still_to_do(spool_relay, sink, webhook):
    webhook.script = lambda request: (200, {"action": "tempfail", "reason": "busy"}, 0)
    relay = spool_relay(remotes=sink.url(), webhook_url=webhook.url)
    queued_id(*send(relay, ["b@example.org"], MESSAGE))
    webhook.script = lambda request: (200, {"action": "reject", "code": 550, "reason": "Spam"}, 0)
    assert wait_until(lambda: bounces(sink.box) and queue_empty(relay))
    assert [m for m in sink.box if m.mail_from != "<>"] == []  # refused by the scanner on retry
    [dsn] = bounces(sink.box)
    assert "550 5.7.1 Spam" in str(dsn)


def cli(*args):
    done = subprocess.run(relay_command() + list(args), capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout, done.stderr


def test_9_command_line_queue_delete_and_flush(spool_relay, late_sink, sink):
    down = late_sink()
    relay = spool_relay(remotes="%s %s" % (down.url(r"recipient=.*@example\.org"),
                                           sink.url() + r"?recipient=.*@example\.com"),
                        queue_retry_min="1h", queue_retry_max="1h")
    ids = [queued_id(*send(relay, ["b@example.org"], MESSAGE)) for _ in range(3)]
    ini = relay.settings.config_path
    status, out, _ = cli("-queue", ini)
    lines = out.splitlines()
    assert status == 0 and len(lines) == 4 and lines[-1].startswith("3 messages queued, ")
    assert lines[0].startswith(ids[0] + " age=") and "from=<app@example.com>" in lines[0]
    assert "pending=b@example.org->smtp://127.0.0.1:%d" % down.port in lines[0]
    assert "attempts=1 next=in " in lines[0] and "ConnectionRefusedError" in lines[0]

    assert cli("-delete", ids[0], ini)[0] == 0
    assert files(relay.spool_dir, "failed") == [ids[0] + ".eml", ids[0] + ".json"]
    assert cli("-delete", "nosuch", ini)[:2] == (1, "")
    assert cli("-delete", "ALL", ini)[1].startswith("moved 2 messages to ")
    assert cli("-queue", ini)[1] == "0 messages queued, 0 bytes\n"
    assert cli("-flush", ini)[0] == 0
    assert wait_until(lambda: relay.spool.queued == 0)  # the relay noticed the files are gone
    assert not os.path.exists(os.path.join(relay.spool_dir, "flush"))
    assert bounces(sink.box) == []  # -delete never bounces


def test_9_command_line_queue_without_spool_dir_is_a_config_error(tmp_path):
    ini = tmp_path / "relay.ini"
    ini.write_text("remotes = file:outbox\n")
    status, _, err = cli("-queue", str(ini))
    assert status == 2 and err == "smtprelay: config: spool_dir: not set, so there is no queue\n"


def test_9_options_retry_max_below_min_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        load(None, {"queue_retry_min": "10m", "queue_retry_max": "1m"}, environ={})
    assert caught.value.option == "queue_retry_max"


def test_9_options_spool_dir_is_relative_to_the_ini(tmp_path):
    ini = tmp_path / "conf" / "relay.ini"
    ini.parent.mkdir()
    ini.write_text("spool_dir = spool\nspool_mode = ALWAYS\nqueue_lifetime = 1h\n")
    settings = load(str(ini), environ={})
    assert settings.spool_dir == str(tmp_path / "conf" / "spool")
    assert (settings.spool_mode, settings.queue_lifetime, settings.bounce) == ("always", 3600.0, True)
