"""SPEC 6: what a session logs. `trace` holds the SMTP dialogue (AUTH
arguments masked), `debug` only events; a DATA timeout says phase=data; a
reloaded users or aliases file is logged; every line carries the session."""

import base64
import logging
import os
import time

from conftest import wait_until
from relay_lib import logs
from relay_lib.delivery.aliases import Aliases
from relay_lib.inbound import policy
from smtp_talk import Talk, write_users

PASSWORD = "hunter2-Pa55"


def dialogue(records):
    return [(r.getMessage(), r.fields["line"]) for r in records
            if r.levelno == logs.TRACE and r.getMessage() in ("command", "reply", "auth response")]


def test_6_trace_logs_the_dialogue_with_auth_masked(relay_factory, certs, tmp_path, relay_log):
    users = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
    relay = relay_factory(listen="tls://127.0.0.1:0", local_cert=certs.cert_path, local_key=certs.key_path,
                          allowed_users=users)
    plain = base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode()
    with Talk(relay.port, tls=certs.client_context()) as t:
        t.reply()
        t.cmd("EHLO client.test")
        assert t.cmd("AUTH PLAIN " + plain).startswith("235 ")
        assert t.cmd("AUTH LOGIN").startswith("503 ")
        t.cmd("QUIT")
    said = dialogue(relay_log.records)
    assert said[0] == ("reply", "220 relay.test ESMTP ready.")
    assert ("command", "EHLO client.test") in said
    assert ("command", "AUTH PLAIN ***") in said and ("command", "AUTH LOGIN") in said
    assert ("reply", "235 2.7.0 Authentication successful") in said
    assert said[-2:] == [("command", "QUIT"), ("reply", "221 2.0.0 Bye")]
    text = repr([(r.getMessage(), r.__dict__) for r in relay_log.records])
    assert PASSWORD not in text and plain not in text
    # Every line of the session, dialogue and events, names the same session and port.
    tagged = {(r.fields["session"], r.fields["port"]) for r in relay_log.records
              if r.levelno <= logging.INFO and "session" in getattr(r, "fields", {})}
    assert len(tagged) == 1


def test_6_debug_logs_events_without_the_dialogue(relay, relay_log):
    with Talk(relay.port, ehlo="client.test") as t:
        t.cmd("NOOP")
        t.cmd("QUIT")

    def debug():
        return [r.getMessage() for r in relay_log.records if r.levelno == logging.DEBUG]

    assert wait_until(lambda: "disconnected" in debug())
    assert debug()[0] == "connected" and debug()[-1] == "disconnected"
    assert "command" not in debug() and "reply" not in debug()


def test_6_data_timeout_is_logged_with_phase_data(relay_factory, relay_log):
    relay = relay_factory(data_timeout="1s")
    with Talk(relay.port, ehlo="client.test") as t:
        assert t.to_data().startswith("354 ")
        t.send(b"Subject: slow\r\n")
        assert t.reply() == "421 4.4.2 Timeout"
    timeouts = [r.fields for r in relay_log.records if r.getMessage() == "timeout, closing"]
    assert [f["phase"] for f in timeouts] == ["data"]


def test_6_users_and_aliases_reload_is_logged(tmp_path, relay_log):
    users = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
    aliases = tmp_path / "aliases"
    aliases.write_text("a@example.org b@example.org\n")
    table, alias_table = policy.Users(users, cache_ttl=0, wait=5), Aliases(str(aliases))
    assert not [r for r in relay_log.records if r.getMessage() == "file reloaded"]  # start-up is no reload
    write_users(tmp_path / "users", {"alice": (PASSWORD, None), "bob": (PASSWORD, None)})
    aliases.write_text("a@example.org c@example.org\nx@example.org y@example.org\n")
    later = time.time() + 5  # a new mtime even on coarse file systems
    for path in (users, str(aliases)):
        os.utime(path, (later, later))
    assert table.authenticate("bob", PASSWORD, "127.0.0.1") == "bob"
    assert alias_table.resolve("a@example.org") == "c@example.org"
    reloads = [r.fields for r in relay_log.records if r.getMessage() == "file reloaded"]
    assert reloads == [{"file": users, "entries": 2}, {"file": str(aliases), "entries": 2}]
