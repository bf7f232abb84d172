"""SPEC 12 metrics and health: /metrics read with prometheus_client's parser
after a known sequence of sessions, refusals and deliveries, /healthz through
a shutdown, the endpoint's limits, and the exposition format itself.

The counters live as long as the process, so values that other tests also
move (messages, refusals, webhook calls) are checked as differences between
two scrapes; per-listener and per-remote series are unique to each test.
"""

import base64
import http.client
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import relay_command, wait_until, write_ini
from relay_lib import metrics
from relay_lib.config import settings as config
from relay_lib.service import Service
from smtp_talk import Talk

GOOD = b"Subject: hello\r\n\r\nall fine\r\n"
VIRUS = b"Subject: virus\r\n\r\nEICAR\r\n"


def get(address, path, method="GET"):
    """(status, body text, content type) of one request, straight to the relay (no proxy)."""
    conn = http.client.HTTPConnection(address[0], address[1], timeout=5)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, answer.read().decode("utf-8"), answer.getheader("Content-Type")
    finally:
        conn.close()


class Scrape:
    """One parsed /metrics: `value(name, **labels)`, 0 for a series not there."""

    def __init__(self, relay):
        status, self.text, content_type = get(relay.metrics_address, "/metrics")
        assert status == 200
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for f in self.families.values() for s in f.samples}

    def value(self, name, **labels):
        return self.samples.get((name, tuple(sorted(labels.items()))), 0)


def delta(before, after, name, **labels):
    return after.value(name, **labels) - before.value(name, **labels)


def scanner_rejects_viruses(request):
    if b"EICAR" in base64.b64decode(request.json["message"]):
        return 200, {"action": "reject", "code": 550, "reason": "Virus found"}, 0
    return 200, {"action": "accept"}, 0


def test_12_metrics_after_a_known_sequence(relay_factory, sink, webhook):
    sink.handler.rcpt_reply = {"busy@example.org": "450 4.2.1 Mailbox busy"}
    webhook.script = scanner_rejects_viruses
    relay = relay_factory(remotes=sink.url(), webhook_url=webhook.url, allowed_nets="127.0.0.1/32",
                          max_connections=1, max_message_size=1000, metrics_listen="127.0.0.1:0")
    listener = "127.0.0.1:%d" % relay.port
    remote = "127.0.0.1:%d" % sink.port
    before = Scrape(relay)

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as client:
        client.sendmail("a@example.com", ["b@example.org"], GOOD)
        client.sendmail("a@example.com", ["b@example.org", "c@example.org"], GOOD)
        with pytest.raises(smtplib.SMTPDataError) as rejected:
            client.sendmail("a@example.com", ["b@example.org"], VIRUS)
        assert (rejected.value.smtp_code, rejected.value.smtp_error) == (550, b"5.7.1 Virus found")
        with pytest.raises(smtplib.SMTPDataError) as tempfailed:
            client.sendmail("a@example.com", ["busy@example.org"], GOOD)
        assert tempfailed.value.smtp_code == 451
        assert tempfailed.value.smtp_error.startswith(b"4.4.1 ")
    assert wait_until(lambda: relay.active_sessions == 0)
    middle = Scrape(relay)
    assert delta(before, middle, "smtprelay_received_bytes_total") == 3 * len(GOOD) + len(VIRUS)

    with Talk(relay.port, ehlo="client.test") as client:
        for body in (GOOD, b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"):  # no SIZE= given
            client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
            assert client.replies(3) == ["250 2.1.0 OK", "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>"]
            client.send(body + b".\r\n")
            last = client.reply()
        assert last == "552 5.3.4 Message too big"
    with pytest.raises(smtplib.SMTPConnectError) as not_allowed:
        smtplib.SMTP("127.0.0.1", relay.port, timeout=5, source_address=("127.0.0.2", 0))
    assert not_allowed.value.smtp_code == 554
    with Talk(relay.port) as held:
        assert held.reply().startswith("220 ")
        with Talk(relay.port) as second:
            assert second.reply() == "421 4.7.0 relay.test Too many connections, try again later"
        during = Scrape(relay)
    assert during.value("smtprelay_sessions_open", listener=listener) == 1
    assert wait_until(lambda: relay.active_sessions == 0)
    after = Scrape(relay)

    assert after.value("smtprelay_sessions_total", listener=listener) == 3
    assert after.value("smtprelay_sessions_open", listener=listener) == 0
    assert delta(before, after, "smtprelay_connections_refused_total", reason="not_allowed") == 1
    assert delta(before, after, "smtprelay_connections_refused_total", reason="too_many") == 1
    assert delta(before, after, "smtprelay_messages_total", result="delivered") == 3
    assert delta(before, after, "smtprelay_messages_total", result="rejected") == 2  # virus, too big
    assert delta(before, after, "smtprelay_messages_total", result="tempfailed") == 1
    assert delta(before, after, "smtprelay_messages_total", result="queued") == 0
    assert delta(before, after, "smtprelay_webhook_calls_total", outcome="accept") == 4
    assert delta(before, after, "smtprelay_webhook_calls_total", outcome="reject") == 1
    assert delta(middle, after, "smtprelay_received_bytes_total") >= len(GOOD) + 1000
    assert after.value("smtprelay_remote_deliveries_total", remote=remote, outcome="delivered") == 3
    assert after.value("smtprelay_remote_deliveries_total", remote=remote, outcome="tempfailed") == 1
    assert after.value("smtprelay_remote_deliveries_total", remote=remote, outcome="rejected") == 0
    assert len(sink.box) == 3

    latency = [s for s in after.families["smtprelay_remote_delivery_seconds"].samples
               if s.labels.get("remote") == remote]
    buckets = [s.value for s in latency if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in latency if s.name.endswith("_bucket")][-1] == "+Inf"
    assert buckets == sorted(buckets) and buckets[-1] == 4
    assert after.value("smtprelay_remote_delivery_seconds_count", remote=remote) == 4
    assert 0 < after.value("smtprelay_remote_delivery_seconds_sum", remote=remote) < 20

    # Counters never reset while the process runs: a new Relay sees them all.
    relay.stop()
    later = Scrape(relay_factory(metrics_listen="127.0.0.1:0"))
    assert later.value("smtprelay_sessions_total", listener=listener) == 3
    assert delta(after, later, "smtprelay_messages_total", result="delivered") == 0
    assert later.value("smtprelay_remote_deliveries_total", remote=remote, outcome="delivered") == 3


def test_12_tls_handshake_failure_is_counted(relay_factory, certs):
    relay = relay_factory(listen="tls://127.0.0.1:0", local_cert=certs.cert_path,
                          local_key=certs.key_path, metrics_listen="127.0.0.1:0")
    before = Scrape(relay)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(b"EHLO not-tls\r\n")
        try:
            assert sock.recv(100) == b""  # closed without a reply
        except ConnectionResetError:
            pass  # closed with our bytes unread: the same, seen as a reset
    assert wait_until(lambda: relay.active_sessions == 0)
    assert delta(before, Scrape(relay), "smtprelay_connections_refused_total", reason="tls_handshake") == 1


def test_12_no_address_or_secret_in_any_label(relay_factory, sink_factory, webhook):
    sink = sink_factory(auth={"mailer": "S3cretPw"})
    relay = relay_factory(remotes=sink.url(userinfo="mailer:S3cretPw"), webhook_url=webhook.url,
                          webhook_secret="HookKey9", allowed_nets="127.0.0.0/8",
                          metrics_listen="127.0.0.1:0")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=5, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("alice@example.com", ["bob@example.org"], b"Subject: Quarterly numbers\r\n\r\nx\r\n")
    assert len(sink.box) == 1 and sink.box[0].login == b"mailer"
    scrape = Scrape(relay)
    for secret in ("S3cretPw", "HookKey9", "mailer", "alice", "bob", "example", "Quarterly",
                   "127.0.0.2", "@"):
        assert secret not in scrape.text
    endpoint = re.compile(r"(tls://|starttls://)?(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+\Z")
    for (name, labels), _ in scrape.samples.items():
        for label, value in labels:
            if label in ("listener", "remote"):
                assert endpoint.match(value), (name, value)
            else:
                assert re.fullmatch(r"[a-z_]+|[0-9.]+|\+Inf", value), (name, label, value)
    assert scrape.value("smtprelay_remote_deliveries_total", remote="127.0.0.1:%d" % sink.port,
                        outcome="delivered") == 1


def test_12_healthz_is_ok_while_listening_and_503_during_shutdown(relay_factory, sink, webhook):
    gate = threading.Event()
    webhook.script = lambda request: (gate.wait(10), (200, {"action": "accept"}, 0))[1]
    relay = relay_factory(remotes=sink.url(), webhook_url=webhook.url, metrics_listen="127.0.0.1:0")
    address = relay.metrics_address
    assert get(address, "/healthz")[:2] == (200, "ok\n")

    answers = []

    def send():
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            answers.append(client.sendmail("a@example.com", ["b@example.org"], GOOD))

    sender = threading.Thread(target=send)
    sender.start()
    stopper = threading.Thread(target=relay.stop)
    try:
        assert wait_until(lambda: webhook.requests)  # the message is being delivered
        stopper.start()
        assert wait_until(lambda: get(address, "/healthz")[0] == 503)
        assert get(address, "/healthz")[1] == "unavailable\n"
        assert get(address, "/metrics")[0] == 200  # still scraped while draining
    finally:
        gate.set()
        sender.join(10)
        if stopper.ident is not None:
            stopper.join(10)
    assert answers == [{}] and len(sink.box) == 1  # the message in progress finished
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2).close()
    assert not Service(relay.settings).healthy()  # no listener up


def test_12_only_metrics_and_healthz_are_served(relay_factory):
    relay = relay_factory(metrics_listen="127.0.0.1:0")
    address = relay.metrics_address
    for path in ("/", "/metrics/", "/metricsx", "/healthz/x", "/favicon.ico"):
        assert get(address, path)[0] == 404, path
    assert get(address, "/metrics?x=1")[0] == 200
    assert get(address, "/metrics", method="POST")[0] == 501
    # A client that connects and says nothing does not stop others being served.
    with socket.create_connection(address, timeout=5):
        assert get(address, "/healthz")[:2] == (200, "ok\n")


def test_12_queue_gauges_read_the_registered_callback(relay_factory, tmp_path, relay_log):
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "a.eml").write_bytes(b"x" * 300)
    (queue / "b.eml").write_bytes(b"y" * 200)
    old = time.time() - 120
    os.utime(str(queue / "a.eml"), (old, old))

    def spool_stats():
        files = [queue / name for name in os.listdir(str(queue))]
        oldest = min((f.stat().st_mtime for f in files), default=time.time())
        return len(files), sum(f.stat().st_size for f in files), time.time() - oldest

    relay = relay_factory(metrics_listen="127.0.0.1:0")
    assert Scrape(relay).value("smtprelay_queue_messages") == 0  # nothing registered: empty
    metrics.register_queue(spool_stats)
    try:
        scrape = Scrape(relay)
        assert scrape.value("smtprelay_queue_messages") == 2
        assert scrape.value("smtprelay_queue_bytes") == 500
        assert 120 <= scrape.value("smtprelay_queue_oldest_age_seconds") < 180

        def broken():
            raise OSError("spool folder gone")

        metrics.register_queue(broken)
        scrape = Scrape(relay)
        assert "smtprelay_queue_messages" not in scrape.families
        assert "smtprelay_messages" in scrape.families
        assert any(r.getMessage() == "queue metrics failed" for r in relay_log.records)
    finally:
        metrics.register_queue(None)
    assert Scrape(relay).value("smtprelay_queue_bytes") == 0


def test_12_unbindable_metrics_port_is_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ini = tmp_path / "r.ini"
        write_ini(ini, {"listen": "127.0.0.1:0", "remotes": "file:outbox",
                        "metrics_listen": "127.0.0.1:%d" % port})
        result = subprocess.run(relay_command() + [str(ini)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("smtprelay: listen: metrics_listen 127.0.0.1:%d: " % port), last
    assert "in use" in last.lower()


@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("127.0.0.1:9101", config.Listener("plain", "127.0.0.1", 9101)),
    ("[::1]:9101", config.Listener("plain", "::1", 9101)),
], ids=["empty-is-off", "ipv4", "ipv6"])
def test_12_metrics_listen_values(text, expected):
    assert config.load(None, {"metrics_listen": text}, environ={}).metrics_listen == expected


@pytest.mark.parametrize("text", ["tls://127.0.0.1:9101", "127.0.0.1:9101 127.0.0.1:9102", "9101"],
                         ids=["scheme", "two-addresses", "no-host"])
def test_12_bad_metrics_listen_is_a_config_error(text):
    with pytest.raises(config.ConfigError) as error:
        config.load(None, {"metrics_listen": text}, environ={})
    assert error.value.option == "metrics_listen"


# -- the exposition format, on a registry of its own -------------------------

def test_12_text_format_escapes_and_histograms():
    registry = metrics.Registry()
    odd = registry.counter("t_odd_total", 'help with \\ and\nnewline "quoted"', ("what",))
    odd.labels('a "quoted" \\ back\nslash').inc()
    odd.labels("plain").add(41)
    odd.labels("plain").inc()
    level = registry.gauge("t_level", "a level").labels()
    for _ in range(3):
        level.inc()
    level.dec()
    spread = registry.histogram("t_seconds", "times", ("where",), (0.1, 1.0)).labels("x")
    for seconds in (0.05, 0.1, 0.5, 7.0):
        spread.observe(seconds)
    text = registry.render()
    assert "# TYPE t_odd_total counter\n" in text
    assert "# HELP t_odd_total help with \\\\ and\\nnewline \"quoted\"\n" in text
    assert 't_seconds_bucket{where="x",le="+Inf"} 4\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["t_odd"].documentation == 'help with \\ and\nnewline "quoted"'
    assert {s.labels["what"]: s.value for s in families["t_odd"].samples} == {
        'a "quoted" \\ back\nslash': 1, "plain": 42}
    assert families["t_level"].samples[0].value == 2
    assert [(s.name, s.labels.get("le"), s.value) for s in families["t_seconds"].samples] == [
        ("t_seconds_bucket", "0.1", 2), ("t_seconds_bucket", "1.0", 3), ("t_seconds_bucket", "+Inf", 4),
        ("t_seconds_sum", None, 7.65), ("t_seconds_count", None, 4)]
    with pytest.raises(ValueError):
        odd.labels("one", "too many")


def test_12_no_increment_is_lost_between_threads():
    tally, level = metrics.Tally(), metrics.Level()
    start = threading.Barrier(8)

    def work():
        start.wait()
        for _ in range(20000):
            tally.inc()
            level.inc()
            level.dec()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert tally.value() == 160000
    assert level.value() == 0
