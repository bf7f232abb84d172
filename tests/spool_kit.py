"""Helpers for the spool tests (this module has no tests): a relay with a
spool and short retry timings, a downstream that is down until the test
brings it up on the same port, the files of the queue, and bounce parsing.
"""

import email
import email.policy
import os

import pytest

from conftest import Downstream, free_port, stopped_at_teardown, wait_until, write_ini
from test_e2e import RelayProcess
from test_delivery_e2e import send  # noqa: F401 (re-exported for the spool tests)

MESSAGE = b"From: app@example.com\r\nTo: b@example.org\r\nSubject: spool\r\n\r\nHello.\r\n"
# Short timings so a test sees several retries in well under a second.
FAST = {"queue_retry_min": "100ms", "queue_retry_max": "200ms", "remote_timeout": "3s",
        "data_timeout": "5s"}


class LateSink:
    """A downstream that is down (nothing listens on its port) until `up()`."""

    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.down = None
        self.started = []

    def url(self, query=""):
        return "smtp://%s:%d%s" % (self.host, self.port, "?" + query if query else "")

    def up(self) -> Downstream:
        self.down = Downstream(host=self.host, port=self.port)
        self.started.append(self.down)
        return self.down

    @property
    def box(self):
        return self.down.box if self.down else []

    def stop(self):
        for d in self.started:
            d.stop()


@pytest.fixture
def late_sink():
    """late_sink(): a LateSink, stopped at teardown."""
    yield from stopped_at_teardown(LateSink)


@pytest.fixture
def spool_relay(relay_factory, tmp_path):
    """relay_factory with spool_dir = tmp_path/spool and FAST timings; `.spool_dir` is set."""
    def factory(**options):
        merged = dict(FAST, spool_dir="spool")
        merged.update(options)
        relay = relay_factory(**merged)
        relay.spool_dir = str(tmp_path / "spool")
        return relay
    return factory


def files(spool_dir, folder="queue"):
    """Sorted file names in one folder of the spool."""
    path = os.path.join(spool_dir, folder)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def queue_empty(relay):
    return relay.spool.queued == 0 and not files(relay.spool_dir)


def bounces(box):
    """The DSNs in a downstream's box (null sender), parsed."""
    return [email.message_from_bytes(m.content, policy=email.policy.default)
            for m in box if m.mail_from == "<>"]


def report_fields(report):
    """(per-message fields, [per-recipient fields]) of a multipart/report [R3464 2]."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = [dict(b) for b in parts[1].get_payload()]
    return blocks[0], blocks[1:]


def arrived(sink, count, timeout=5.0):
    """Wait until `sink` holds `count` messages that are not bounces; returns them."""
    def originals():
        return [m for m in sink.box if m.mail_from != "<>"]
    wait_until(lambda: len(originals()) >= count, timeout)
    return originals()


@pytest.fixture
def spool_process(tmp_path):
    """spool_process(options): the relay as its own process, with a spool in
    tmp_path/conf/spool, so a test can kill -9 it and start another on the
    same spool. Each is ended at teardown (SIGTERM, or it was killed)."""
    started = []

    def start(options):
        merged = dict(FAST, listen="127.0.0.1:0", hostname="e2e.test", spool_dir="spool")
        merged.update(options)
        folder = tmp_path / "conf"
        folder.mkdir(exist_ok=True)
        ini = str(folder / ("relay%d.ini" % len(started)))
        write_ini(ini, merged)
        relay = RelayProcess(ini, str(folder))
        started.append(relay)
        relay.wait_listening()
        relay.host = "127.0.0.1"
        relay.spool_dir = str(folder / "spool")
        return relay

    yield start
    for relay in started:
        relay.stop()


def kill_9(relay):
    """The hardest stop there is: no handler runs, nothing is flushed."""
    relay.proc.kill()
    relay.proc.wait(10)
