"""SPEC 4: the delivery steps (aliases, command, file: remote), their replies and the log line."""

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

from relay_lib.delivery.steps import Delivery, received_header
from delivery_kit import BODY, deliver_once, envelope, settings_for


def command_line(tmp_path, code, sleep=0.0):
    """A `command` option: a Python one-liner that saves stdin and env, then exits with `code`."""
    script = tmp_path / "cmd.py"
    script.write_text(
        "import json, os, sys, time\n"
        "data = sys.stdin.buffer.read()\n"
        "out = os.path.join(%r, 'cmd-' + os.environ['SMTPRELAY_ID'])\n"
        "open(out + '.eml', 'wb').write(data)\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('SMTPRELAY_')}\n"
        "open(out + '.json', 'w').write(json.dumps(env))\n"
        "sys.stderr.write('exiting %d')\n"
        "time.sleep(%r)\n"
        "sys.exit(%d)\n" % (str(tmp_path), code, sleep, code))
    return "%s %s" % (sys.executable, script)  # no quotes: the ini strips one pair


# -- 3.3 the Received header ------------------------------------------------------

def test_3_3_received_header_plain_esmtp(tmp_path):
    settings = settings_for(tmp_path)
    env = envelope(rcpts=["b@example.org"],
                   received_at=datetime(2026, 11, 24, 15, 4, 5, tzinfo=timezone.utc))
    assert received_header(settings, env) == (
        b"Received: from printer.lan ([127.0.0.1])\r\n"
        b"\tby relay.test (smtprelay) with ESMTP id " + env.id.encode() + b"\r\n"
        b"\tfor <b@example.org>; Tue, 24 Nov 2026 15:04:05 +0000\r\n")


def test_3_3_received_header_names_no_recipient_when_there_are_several(tmp_path):
    settings = settings_for(tmp_path)
    env = envelope(rcpts=["b@example.org", "c@example.org"],
                   received_at=datetime(2026, 11, 24, 15, 4, 5, tzinfo=timezone.utc))
    assert received_header(settings, env) == (
        b"Received: from printer.lan ([127.0.0.1])\r\n"
        b"\tby relay.test (smtprelay) with ESMTP id " + env.id.encode()
        + b"; Tue, 24 Nov 2026 15:04:05 +0000\r\n")


def test_3_3_received_header_tls_auth_and_cleaned_helo(tmp_path):
    settings = settings_for(tmp_path)
    env = envelope(helo="evil (x)<y>\x01\u00e9.lan", user="app1", peer="::1",
                   tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
    header = received_header(settings, env).decode()
    assert header.startswith("Received: from evilxy.lan ([::1])\r\n")
    assert "with ESMTPSA (TLSv1.3 TLS_AES_256_GCM_SHA384) id %s\r\n" % env.id in header
    assert header.count("\r\n") == 3 and "\n" not in header.replace("\r\n", "")


# -- 4: steps and the no-remote case ------------------------------------------

def test_4_no_remote_and_no_command_is_554(tmp_path):
    reply, _ = deliver_once(tmp_path)
    assert str(reply) == "554 5.3.5 No remote configured"


def test_4_file_remote_writes_eml_and_json(tmp_path):
    settings = settings_for(tmp_path, remotes="file:outbox")
    delivery = Delivery(settings)
    env = envelope(rcpts=["b@example.org", "c@example.org"], user="app1")
    reply = delivery.deliver(env, BODY)
    delivery.close()
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    outbox = tmp_path / "outbox"
    assert sorted(os.listdir(outbox)) == [env.id + ".eml", env.id + ".json"]  # no temp file left
    assert (outbox / (env.id + ".eml")).read_bytes() == received_header(settings, env) + BODY
    meta = json.loads((outbox / (env.id + ".json")).read_text())
    assert meta["id"] == env.id and meta["from"] == "app@example.com"
    assert meta["to"] == ["b@example.org", "c@example.org"] and meta["username"] == "app1"
    assert meta["size"] == len(received_header(settings, env) + BODY)


def test_4_1_unwritable_file_remote_is_451(tmp_path):
    (tmp_path / "blocked").write_text("a file where the folder should be")
    reply, _ = deliver_once(tmp_path, remotes="file:blocked/outbox")
    assert str(reply) == "451 4.4.1 Forwarding failed, try again later"


# -- 4 step 1: aliases ----------------------------------------------------------

def rcpts_after_aliases(tmp_path, sink, aliases_text, rcpts):
    """Deliver to `rcpts` with this aliases file; the RCPTs the downstream saw."""
    aliases = tmp_path / "aliases"
    aliases.write_text(aliases_text)
    env = envelope(rcpts=rcpts)
    reply, _ = deliver_once(tmp_path, env=env, remotes=sink.url(), aliases_file=str(aliases))
    assert reply.code == 250
    return sink.box[0].rcpt_tos


def test_4_aliases_rewrite_recipients_case_insensitively(tmp_path, sink):
    assert rcpts_after_aliases(tmp_path, sink, "# comment\nPostmaster@Example.org admin@example.net\n",
                               ["postmaster@example.org", "other@example.org"]) == [
        "admin@example.net", "other@example.org"]


def test_4_aliases_reloaded_when_the_file_changes(tmp_path, sink):
    aliases = tmp_path / "aliases"
    aliases.write_text("b@example.org first@example.net\n")
    delivery = Delivery(settings_for(tmp_path, remotes=sink.url(), aliases_file=str(aliases)))
    try:
        assert delivery.deliver(envelope(), BODY).code == 250
        aliases.write_text("b@example.org second-target@example.net\n")
        later = time.time() + 5  # a new mtime even on coarse file systems
        os.utime(aliases, (later, later))
        assert delivery.deliver(envelope(), BODY).code == 250
    finally:
        delivery.close()
    assert [m.rcpt_tos for m in sink.box] == [["first@example.net"], ["second-target@example.net"]]


def test_4_two_aliases_to_one_target_give_one_rcpt(tmp_path, sink):
    assert rcpts_after_aliases(tmp_path, sink, "a@example.org team@example.net\nb@example.org team@example.net\n",
                               ["a@example.org", "b@example.org"]) == ["team@example.net"]


# -- 4.3 command --------------------------------------------------------------

def test_4_3_command_gets_message_and_environment(tmp_path):
    env = envelope(rcpts=["b@example.org", "c@example.org"], peer="10.1.2.3")
    settings = settings_for(tmp_path, command=command_line(tmp_path, 0))
    delivery = Delivery(settings)
    reply = delivery.deliver(env, BODY)
    delivery.close()
    assert str(reply) == "250 2.0.0 OK %s" % env.id
    out = tmp_path / ("cmd-" + env.id)
    assert (tmp_path / ("cmd-%s.eml" % env.id)).read_bytes() == received_header(settings, env) + BODY
    assert json.loads(out.with_suffix(".json").read_text()) == {
        "SMTPRELAY_FROM": "app@example.com", "SMTPRELAY_TO": "b@example.org c@example.org",
        "SMTPRELAY_PEER": "10.1.2.3", "SMTPRELAY_ID": env.id}


def test_4_3_command_then_remotes(tmp_path, sink):
    reply, env = deliver_once(tmp_path, command=command_line(tmp_path, 0), remotes=sink.url())
    assert reply.code == 250
    assert (tmp_path / ("cmd-%s.eml" % env.id)).exists()
    assert len(sink.box) == 1


def test_4_3_command_exit_75_is_451(tmp_path, sink):
    reply, _ = deliver_once(tmp_path, command=command_line(tmp_path, 75), remotes=sink.url())
    assert str(reply) == "451 4.3.0 External command failed temporarily, try again later"
    assert sink.box == []


def test_4_3_command_other_exit_is_554(tmp_path, sink):
    reply, _ = deliver_once(tmp_path, command=command_line(tmp_path, 1), remotes=sink.url())
    assert str(reply) == "554 5.3.0 External command failed"
    assert sink.box == []


def test_4_3_command_time_limit_is_data_timeout(tmp_path):
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, command=command_line(tmp_path, 0, sleep=20), data_timeout="1s")
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert time.monotonic() - started < 5


def test_4_3_missing_command_program_is_451(tmp_path):
    reply, _ = deliver_once(tmp_path, command=str(tmp_path / "no-such-program"))
    assert reply.code == 451 and reply.enhanced == "4.3.0"


# -- 6: the one info line per message -----------------------------------------

def test_6_one_info_line_per_message_without_body_or_password(tmp_path, relay_log, sink_factory):
    caplog = relay_log
    sink = sink_factory(auth={"app1": "pw-Secret-123"})
    env = envelope(user="app1", rcpts=["b@example.org", "c@example.org"])
    reply, _ = deliver_once(tmp_path, env=env, remotes=sink.url(userinfo="app1:pw-Secret-123"))
    assert reply.code == 250
    ours = [r for r in caplog.records if r.name.startswith("smtprelay")]
    info = [r for r in ours if r.levelno == logging.INFO]
    assert len(info) == 1
    f = info[0].fields
    assert f["id"] == env.id and f["peer"] == "127.0.0.1" and f["user"] == "app1"
    assert f["from"] == "app@example.com" and f["to"] == ["b@example.org", "c@example.org"]
    assert f["size"] == len(sink.box[0].content) and isinstance(f["ms"], int)
    assert "smtp://app1:***@127.0.0.1:%d 250" % sink.port in f["remote"]
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in ours)
    assert "pw-Secret-123" not in text
    assert "Hello." not in text and "leading dot line" not in text


def test_6_failed_message_still_logs_one_info_line_with_the_result(tmp_path, relay_log, sink):
    caplog = relay_log
    sink.handler.data_reply = "554 5.6.0 Content rejected"
    reply, env = deliver_once(tmp_path, remotes=sink.url())
    info = [r for r in caplog.records if r.name == "smtprelay" and r.levelno == logging.INFO]
    assert len(info) == 1
    assert info[0].fields["result"] == str(reply) == "554 5.6.0 127.0.0.1: Content rejected"
    assert any(r.levelno == logging.WARNING and r.fields.get("id") == env.id
               for r in caplog.records if r.name == "smtprelay")
