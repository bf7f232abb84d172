"""Where the capabilities meet: the spool with failover, OAuth, metrics,
AUTH and PROXY; the PROXY header with the AUTH penalty and the logs; the
command line and a graceful stop with all of them on. Real relays, real
downstreams, a real token endpoint and a real scanner, all on loopback."""

import json
import os
import re
import shutil
import smtplib
import socket
import threading
from types import SimpleNamespace

import pytest

from conftest import ROOT, free_port, outbox_messages, relay_command, wait_until, write_ini
from oauth_kit import CLIENT_SECRET, endpoint, oauth_options, upstream_factory  # noqa: F401
from relay_lib import cli
from relay_lib.spool import queue as spool
from smtp_talk import Talk, write_users
from spool_kit import MESSAGE, files, late_sink, queue_empty, spool_process, spool_relay  # noqa: F401
from test_auth_cache import PASSWORD, PENALTY, FAILED, plain
from test_cli import run_relay
from test_e2e import RelayProcess
from test_metrics import Scrape
from test_proxy import v1

CLIENT = "203.0.113.7"
ALLOWED = "127.0.0.0/8 203.0.113.0/24 198.51.100.0/24"


def _records(caplog, message):
    return [r.fields for r in caplog.records if r.getMessage() == message]


def _group(*urls, name="mx"):
    return " ".join("%s%sfailover=%s" % (u, "&" if "?" in u else "?", name) for u in urls)


def _dead_url():
    return "smtp://127.0.0.1:%d" % free_port()


def _queued_state(relay):
    names = [n for n in files(relay.spool_dir) if n.endswith(".json")]
    assert len(names) == 1, names
    with open(os.path.join(relay.spool_dir, "queue", names[0]), encoding="utf-8") as f:
        return json.load(f)


def _is_queued(code, text):
    return code == 250 and text.startswith(b"2.0.0 OK ") and text.endswith(b" queued")


class ProxiedSMTP(smtplib.SMTP):
    """smtplib behind a load balancer: the PROXY header goes out first."""

    def __init__(self, header, *args, **kwargs):
        self._header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self._header)
        return sock


def send(relay, rcpts, sender="app@example.com"):
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        return client.data(MESSAGE)


# -- SPEC 9 x 11: the spool and failover groups ---------------------------------

def test_11_failover_group_queued_as_one_destination_and_retried_as_a_group(
        spool_relay, sink_factory, relay_log):
    backup = sink_factory()
    backup.handler.data_reply = "451 4.3.0 Try again later"
    primary = _dead_url()
    relay = spool_relay(remotes=_group(primary, backup.url()))
    assert _is_queued(*send(relay, ["b@one.test", "c@one.test"]))
    state = _queued_state(relay)
    assert [(p["dest"], p["rcpt"], p["state"]) for p in state["pairs"]] == [
        ("mx", "b@one.test", "pending"), ("mx", "c@one.test", "pending")]
    assert len(_records(relay_log, "queued")) == 1
    backup.handler.data_reply = None
    assert wait_until(lambda: queue_empty(relay))
    assert [m.rcpt_tos for m in backup.box] == [["b@one.test", "c@one.test"]]
    # The dead primary is skipped on the retry: the log names the member that took it.
    retries = _records(relay_log, "retry")
    assert retries[-1]["result"] == "ok"
    assert retries[-1]["remote"] == "%s 250 2.0.0 Queued as Q1" % backup.url()
    assert [f["remote"] for f in _records(relay_log, "remote failed")].count(primary) == 1
    assert len(_records(relay_log, "delivered")) == 1


def test_11_every_member_skipped_on_a_queue_retry_all_are_tried_in_order(spool_relay, late_sink, relay_log):
    first, second = late_sink(), late_sink()
    relay = spool_relay(remotes=_group(first.url(), second.url()))
    assert _is_queued(*send(relay, ["b@one.test"]))
    assert relay.delivery.dispatcher.is_down(relay.settings.remotes[0])
    assert relay.delivery.dispatcher.is_down(relay.settings.remotes[1])
    second.up()
    assert wait_until(lambda: queue_empty(relay))
    assert len(second.box) == 1 and first.box == []
    last = _records(relay_log, "retry")[-1]["remote"]
    assert last.startswith("%s 451; %s 250 " % (first.url(), second.url()))


# -- SPEC 9 x 10: the spool and OAuth --------------------------------------------

def test_10_token_endpoint_outage_is_queued_and_delivered_when_it_returns(
        spool_relay, endpoint, upstream_factory, relay_log):  # noqa: F811
    upstream = upstream_factory()
    endpoint.mode = "aadsts"
    relay = spool_relay(remotes=upstream.url(), **oauth_options(endpoint))
    assert _is_queued(*send(relay, ["b@example.org"]))
    assert upstream.box == []
    assert "AADSTS7000215" in _records(relay_log, "queued")[0]["reason"]
    endpoint.mode = "ok"
    assert wait_until(lambda: queue_empty(relay))
    assert [m.rcpt_tos for m in upstream.box] == [["b@example.org"]]
    assert upstream.handler.xoauth2[-1] == ("scanner@contoso.test", True)
    text = relay_log.text + " ".join(str(getattr(r, "fields", "")) for r in relay_log.records)
    for secret in [CLIENT_SECRET] + endpoint.issued:
        assert secret not in text


# -- SPEC 9 x 12: the spool and the metrics ----------------------------------------

def test_12_queued_messages_are_counted_and_the_queue_gauges_drain(spool_relay, late_sink):
    down = late_sink()
    relay = spool_relay(remotes=down.url(), metrics_listen="127.0.0.1:0")
    before = Scrape(relay)
    assert _is_queued(*send(relay, ["b@example.org"]))
    assert _is_queued(*send(relay, ["c@example.org"]))
    during = Scrape(relay)
    assert during.value("smtprelay_messages_total", result="queued") - before.value(
        "smtprelay_messages_total", result="queued") == 2
    assert during.value("smtprelay_messages_total", result="tempfailed") == before.value(
        "smtprelay_messages_total", result="tempfailed")
    assert during.value("smtprelay_queue_messages") == 2
    on_disk = sum(os.path.getsize(os.path.join(relay.spool_dir, "queue", n)) for n in files(relay.spool_dir))
    assert during.value("smtprelay_queue_bytes") == on_disk
    assert during.value("smtprelay_queue_oldest_age_seconds") >= 0
    down.up()
    assert wait_until(lambda: len(down.box) == 2)
    assert wait_until(lambda: Scrape(relay).value("smtprelay_queue_messages") == 0)
    after = Scrape(relay)
    assert after.value("smtprelay_queue_bytes") == 0
    assert after.value("smtprelay_queue_oldest_age_seconds") == 0


# -- SPEC 9 x 2.4 x 12: who sent it survives the queue ----------------------------

def test_9_user_peer_and_tls_survive_the_queue_behind_proxy(
        spool_relay, certs, sink, webhook, tmp_path, relay_log):
    calls = []

    def scanner(request):
        calls.append(request.json)
        return (503, None, 0) if len(calls) == 1 else (200, {"action": "accept"}, 0)
    webhook.script = scanner
    users = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
    relay = spool_relay(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                        local_key=certs.key_path, allowed_users=users, proxy_nets="127.0.0.0/8",
                        allowed_nets=ALLOWED, remotes=sink.url(), webhook_url=webhook.url)
    with ProxiedSMTP(v1(CLIENT), relay.host, relay.port, timeout=10) as client:
        client.ehlo("printer.lan")
        client.starttls(context=certs.client_context())
        client.ehlo("printer.lan")
        client.login("alice", PASSWORD)
        client.mail("app@example.com")
        client.rcpt("b@example.org")
        assert _is_queued(*client.data(MESSAGE))
    envelope = _queued_state(relay)["envelope"]
    assert (envelope["user"], envelope["peer"], bool(envelope["tls"])) == ("alice", CLIENT, True)
    assert wait_until(lambda: queue_empty(relay))
    assert len(calls) == 2
    assert [(c["peer"], c["username"], c["tls"]) for c in calls] == [(CLIENT, "alice", True)] * 2
    content = sink.box[0].content
    assert content.startswith(b"Received: from printer.lan ([%s])" % CLIENT.encode())
    assert b" with ESMTPSA (TLS" in content.split(b"\r\n\r\n")[0]
    message_lines = _records(relay_log, "message")
    assert [(f["peer"], f["user"]) for f in message_lines] == [(CLIENT, "alice")]


# -- SPEC 2.4 x 12: the AUTH penalty and the logs behind a load balancer ---------

def _proxied_auth(relay, certs, client, password):
    with Talk(relay.port) as t:
        t.send(v1(client))
        assert t.reply().startswith("220 ")
        t.cmd("EHLO x")
        assert t.cmd("STARTTLS").startswith("220 ")
        t.starttls(certs.client_context())
        t.cmd("EHLO x")
        return t.cmd(plain("alice", password))


def test_2_4_auth_penalty_is_per_real_client_behind_proxy(relay_factory, certs, tmp_path, relay_log):
    users = write_users(tmp_path / "users", {"alice": (PASSWORD, None)})
    relay = relay_factory(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                          local_key=certs.key_path, allowed_users=users, proxy_nets="127.0.0.0/8",
                          allowed_nets=ALLOWED)
    for n in range(10):
        assert _proxied_auth(relay, certs, CLIENT, "guess-%d" % n) == FAILED
    assert _proxied_auth(relay, certs, CLIENT, PASSWORD) == PENALTY
    # Another client behind the same load balancer is not locked out.
    assert _proxied_auth(relay, certs, "198.51.100.9", PASSWORD).startswith("235 2.7.0 ")
    warnings = [r.fields for r in relay_log.records
                if r.getMessage().startswith("too many authentication failures")]
    assert [w["client"] for w in warnings] == [CLIENT]


def test_12_session_lines_behind_proxy_carry_the_client_address_and_port(relay_factory, relay_log):
    relay = relay_factory(proxy_nets="127.0.0.0/8", allowed_nets=ALLOWED)
    with Talk(relay.port) as t:
        t.send(v1(CLIENT, sport=40123))
        assert t.reply().startswith("220 ")
        assert t.cmd("EHLO printer.lan").startswith("250-")
        assert t.to_data() == "354 End data with <CR><LF>.<CR><LF>"
        assert t.cmd("Subject: x\r\n\r\nHello.\r\n.").startswith("250 2.0.0 OK ")
        assert t.cmd("QUIT").startswith("221 ")
    assert wait_until(lambda: _records(relay_log, "disconnected"))
    lines = [r.fields for r in relay_log.records
             if getattr(r, "fields", {}).get("session")]
    assert len(lines) > 5
    assert {(f.get("peer"), f["port"]) for f in lines if "peer" in f} == {(CLIENT, 40123)}
    assert {f["port"] for f in lines} == {40123}


# -- the command line over every capability ---------------------------------------

def test_6_check_prints_every_capability_and_masks_every_secret(tmp_path):
    ini = tmp_path / "all.ini"
    write_ini(ini, {
        "remotes": "starttls://u%40x.com:Rem0tePa55@a.example.com?failover=mx "
                   "starttls://box%40contoso.com@b.example.com?auth=xoauth2&failover=mx file:outbox",
        "spool_dir": "spool", "spool_mode": "always", "queue_retry_min": "30s",
        "oauth_token_url": "https://tok:T0kenUrlPa55@login.example.com/t/oauth2/v2.0/token",
        "oauth_client_id": "app-id", "oauth_client_secret": "Cl1entSecret",
        "oauth_refresh_token": "Refr3shToken",
        "webhook_url": "https://scan:WebhookUrlPa55@scanner.example/check", "webhook_secret": "HmacKey9",
        "failover_skip": "10s", "proxy_nets": "10.0.0.0/8", "metrics_listen": "127.0.0.1:9101"})
    result = run_relay("-check", str(ini))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    for line in ["spool_dir = %s" % (tmp_path / "spool"), "spool_mode = always", "queue_retry_min = 30s",
                 "failover_skip = 10s", "proxy_nets = 10.0.0.0/8", "metrics_listen = 127.0.0.1:9101",
                 "oauth_client_id = app-id", "oauth_client_secret = ***", "oauth_refresh_token = ***",
                 "webhook_secret = ***", "oauth_token_url = https://tok:***@login.example.com/t/oauth2/v2.0/token",
                 "webhook_url = https://scan:***@scanner.example/check",
                 "  remote 1: starttls://u@x.com:***@a.example.com:587 auth=plain skipVerify=false "
                 "recipient=(none) failover=mx limits: connections=20 (default) rate=none (default) recipients=none (default)",
                 "  remote 2: starttls://box@contoso.com@b.example.com:587 auth=xoauth2 skipVerify=false "
                 "recipient=(none) failover=mx limits: connections=20 (default) rate=none (default) recipients=none (default)",
                 "  remote 3: file:%s" % (tmp_path / "outbox"), "configuration OK"]:
        assert line in out, result.stdout
    for secret in ("Rem0tePa55", "T0kenUrlPa55", "Cl1entSecret", "Refr3shToken", "WebhookUrlPa55", "HmacKey9"):
        assert secret not in result.stdout + result.stderr


def test_10_test_remotes_checks_every_failover_member_and_file_remote(tmp_path, sink_factory):
    live, backup = sink_factory(), sink_factory()
    dead = _dead_url()
    (tmp_path / "outbox").mkdir()
    ini = tmp_path / "r.ini"
    write_ini(ini, {"remotes": "%s file:outbox" % _group(live.url(), backup.url()), "remote_timeout": "2s"})
    result = run_relay("-test-remotes", str(ini))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok   %s: ok" % live.url(), "ok   %s: ok" % backup.url(),
                                          "ok   file:%s: writable folder" % (tmp_path / "outbox")]
    (tmp_path / "not-a-folder").write_text("")
    write_ini(ini, {"remotes": "%s file:not-a-folder" % _group(dead, backup.url()), "remote_timeout": "2s"})
    result = run_relay("-test-remotes", str(ini))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL %s: connect: " % dead)
    assert lines[1] == "ok   %s: ok" % backup.url()
    assert lines[2].startswith("FAIL file:%s: folder: " % (tmp_path / "not-a-folder"))
    assert live.box == backup.box == []


def test_9_queue_lists_a_real_spool(spool_relay, late_sink, tmp_path):
    down = late_sink()
    relay = spool_relay(remotes=_group(down.url(), _dead_url()), queue_retry_min="1h", queue_retry_max="2h")
    code, text = send(relay, ["b@one.test"])
    assert _is_queued(code, text)
    message_id = text.split()[2].decode()
    result = run_relay("-queue", str(tmp_path / "relay0.ini"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    size = sum(os.path.getsize(os.path.join(relay.spool_dir, "queue", n)) for n in files(relay.spool_dir))
    assert lines[-1] == "1 message queued, %d bytes" % size
    assert len(lines) == 2
    assert lines[0].startswith("%s age=0m0" % message_id)
    assert " from=<app@example.com> pending=b@one.test->mx attempts=1 next=" in lines[0]
    assert re.search(r" next=in (0h59m|1h0[0-6]m) error=ConnectionRefusedError: ", lines[0]), lines[0]


# -- SPEC 6 x 9 x 10 x 12: a graceful stop with everything on -----------------------

def test_6_graceful_stop_with_spool_oauth_in_flight_metrics_and_pool(
        spool_relay, sink, endpoint, upstream_factory, relay_log):  # noqa: F811
    upstream = upstream_factory()
    endpoint.mode, endpoint.delay = "slow", 5.0
    options = dict(remotes="%s %s" % (sink.url(), upstream.url()), remote_timeout="1s",
                   metrics_listen="127.0.0.1:0", proxy_nets="10.0.0.0/8", **oauth_options(endpoint))
    relay = spool_relay(**options)
    assert _is_queued(*send(relay, ["b@example.org"]))  # the sink took it, the token did not come
    assert len(sink.box) == 1
    assert relay.delivery.dispatcher.idle_count(relay.settings.remotes[0]) == 1
    # A retry is waiting for the token endpoint when the stop comes.
    assert wait_until(lambda: endpoint.requests >= 2)
    metrics_address = relay.metrics_address
    relay.stop()
    assert relay.delivery.dispatcher.idle_count(relay.settings.remotes[0]) == 0
    with pytest.raises(OSError):
        socket.create_connection(metrics_address, timeout=1).close()
    assert len(files(relay.spool_dir)) == 2  # still queued for the next start
    assert not [r for r in relay_log.records if r.getMessage() == "queue attempts still running at shutdown"]
    # The next start delivers it where it is still owed, and only there.
    endpoint.mode = "ok"
    again = spool_relay(**options)
    assert wait_until(lambda: queue_empty(again))
    assert len(upstream.box) == 1 and len(sink.box) == 1


# -- the shipped ini, out of the box ------------------------------------------------

def test_2_shipped_ini_runs_out_of_the_box_and_passes_check(tmp_path):
    """`make run` with smtprelay.ini as shipped (only the port is free-chosen): a
    message sent with smtplib lands in outbox/ beside the ini."""
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(os.path.join(ROOT, "smtprelay.ini"), str(conf / "smtprelay.ini"))
    ini = str(conf / "smtprelay.ini")
    assert run_relay("-check", ini).returncode == 0
    relay = RelayProcess(ini, str(tmp_path), argv=relay_command() + [ini, "-listen", "127.0.0.1:0"])
    try:
        relay.wait_listening()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("app@example.com", ["b@example.org"], MESSAGE)
        assert [meta["to"] for meta, _ in outbox_messages(str(conf / "outbox"))] == [["b@example.org"]]
    finally:
        assert relay.stop() == 0
    assert "Traceback" not in relay.stderr


# -- Windows branches of what the merges added ----------------------------------------

class _WindowsOs:
    """The os module as the spool sees it on Windows: os.name is "nt", and a
    folder cannot be opened (os.open fails), so it cannot be fsynced."""

    name = "nt"

    def __getattr__(self, attr):
        return getattr(os, attr)

    @staticmethod
    def open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return os.open(path, flags, *args)


def test_9_windows_spool_queues_retries_fails_and_deletes_without_folder_fsync(
        spool_relay, sink, monkeypatch, tmp_path):
    monkeypatch.setattr(spool, "os", _WindowsOs())
    monkeypatch.setattr(spool, "sys", SimpleNamespace(platform="win32"))
    later, refused = "451 4.2.1 Try again later", "550 5.1.1 No such user"
    sink.handler.rcpt_reply = {"b@example.org": later, "c@example.org": later}
    relay = spool_relay(remotes=sink.url())
    first = send(relay, ["b@example.org"])[1].split()[2].decode()
    assert _is_queued(*send(relay, ["c@example.org"]))
    assert relay.spool._group is None
    # A permanent refusal on retry: the files move to failed/, a bounce is queued and sent.
    sink.handler.rcpt_reply = {"b@example.org": refused, "c@example.org": refused}
    assert wait_until(lambda: len(files(relay.spool_dir, "failed")) == 4)
    assert first + ".eml" in files(relay.spool_dir, "failed")
    assert wait_until(lambda: queue_empty(relay) and len(sink.box) == 2)
    assert [m.rcpt_tos for m in sink.box] == [["app@example.com"]] * 2  # the bounces
    # -delete on Windows: the files move without a folder fsync.
    sink.handler.rcpt_reply = {"d@example.org": later}
    code, text = send(relay, ["d@example.org"])
    assert _is_queued(code, text)
    relay.stop()
    assert spool.delete(relay.settings, text.split()[2].decode())[0] == 0
    assert len(files(relay.spool_dir, "failed")) == 6 and files(relay.spool_dir) == []


def test_6_windows_signals_stop_on_break_and_install_no_posix_signal(monkeypatch):
    installed = {}
    fake = SimpleNamespace(SIGINT=2, SIGTERM=15, SIGBREAK=21,
                           Signals=lambda n: SimpleNamespace(name={2: "SIGINT", 15: "SIGTERM", 21: "SIGBREAK"}[n]),
                           signal=lambda number, handler: installed.__setitem__(number, handler))
    monkeypatch.setattr(cli, "signal", fake)
    stop, received = threading.Event(), []
    cli._install_signal_handlers(stop, received)
    assert sorted(installed) == [2, 15, 21]
    installed[21](21, None)
    assert stop.is_set() and received == ["SIGBREAK"]


def test_6_sigterm_with_everything_on_exits_0_and_keeps_the_queue(
        spool_process, sink, endpoint, upstream_factory):  # noqa: F811
    upstream = upstream_factory()
    endpoint.mode, endpoint.delay = "slow", 5.0
    relay = spool_process(dict(
        remotes="%s %s" % (_group(_dead_url(), sink.url()), upstream.url()), remote_timeout="1s",
        metrics_listen="127.0.0.1:0", proxy_nets="10.0.0.0/8", allowed_nets=ALLOWED,
        auth_cache_ttl="1m", **oauth_options(endpoint)))
    assert _is_queued(*send(relay, ["b@example.org"]))
    assert len(sink.box) == 1
    assert wait_until(lambda: endpoint.requests >= 2)  # a retry waits for the token
    assert relay.stop() == 0
    assert "Traceback" not in relay.stderr
    assert "stopped" in relay.stderr
    assert len(files(relay.spool_dir)) == 2


def test_9_always_mode_hands_a_failover_group_to_the_background(spool_relay, sink, relay_log):
    dead = _dead_url()
    relay = spool_relay(remotes=_group(dead, sink.url()), spool_mode="always", metrics_listen="127.0.0.1:0")
    before = Scrape(relay)
    assert _is_queued(*send(relay, ["b@one.test"]))
    assert wait_until(lambda: queue_empty(relay) and len(sink.box) == 1)
    after = Scrape(relay)
    assert after.value("smtprelay_messages_total", result="queued") - before.value(
        "smtprelay_messages_total", result="queued") == 1
    assert after.value("smtprelay_messages_total", result="delivered") == before.value(
        "smtprelay_messages_total", result="delivered")
    retry = _records(relay_log, "retry")[-1]
    assert (retry["attempt"], retry["result"]) == (1, "ok")
    assert retry["remote"].startswith("%s 451; %s 250 " % (dead, sink.url()))


def test_6_stop_during_a_token_fetch_for_a_waiting_client_queues_and_answers(
        spool_relay, endpoint, upstream_factory):  # noqa: F811
    upstream = upstream_factory()
    endpoint.mode, endpoint.delay = "slow", 5.0
    relay = spool_relay(remotes=upstream.url(), remote_timeout="1s", **oauth_options(endpoint))
    answers = []

    def one_message():
        client = smtplib.SMTP(relay.host, relay.port, timeout=10)
        try:
            client.ehlo("client.test")
            client.mail("app@example.com")
            client.rcpt("b@example.org")
            answers.append(client.data(MESSAGE))
            answers.append(client.noop())
        finally:
            client.close()
    client = threading.Thread(target=one_message)
    client.start()
    assert wait_until(lambda: endpoint.requests == 1)  # the client waits on the token fetch
    relay.stop()
    client.join(10)
    # The message gets its reply; then, between transactions, the session is
    # told the relay is shutting down.
    assert len(answers) == 2 and _is_queued(*answers[0])
    assert answers[1] == (421, b"4.3.2 Shutting down")
    assert len(files(relay.spool_dir)) == 2 and upstream.box == []


def test_11_recipient_refused_for_now_by_a_member_goes_to_the_next_without_spool(relay_factory, sink_factory):
    first, second = sink_factory(), sink_factory()
    first.handler.rcpt_reply = {"y@one.test": "451 4.2.1 Mailbox busy"}
    relay = relay_factory(remotes=_group(first.url(), second.url()))
    code, text = send(relay, ["x@one.test", "y@one.test"])
    assert code == 250 and not text.endswith(b" queued")
    assert [m.rcpt_tos for m in second.box] == [["x@one.test", "y@one.test"]]


def test_11_recipient_refused_for_now_by_a_member_goes_to_the_next_with_spool(spool_relay, sink_factory):
    first, second = sink_factory(), sink_factory()
    first.handler.rcpt_reply = {"y@one.test": "451 4.2.1 Mailbox busy"}
    relay = spool_relay(remotes=_group(first.url(), second.url()), queue_retry_min="1h",
                        queue_retry_max="1h")
    code, text = send(relay, ["x@one.test", "y@one.test"])
    assert [m.rcpt_tos for m in first.box] == [["x@one.test"]]
    assert [m.rcpt_tos for m in second.box] == [["y@one.test"]]
    assert code == 250 and not text.endswith(b" queued")
