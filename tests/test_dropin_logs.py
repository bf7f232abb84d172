"""SPEC 2.3 and 6 as a Go smtprelay user meets them: the relay run as a
process from an ini written for the Go program, with its log_level and
log_format values, logging in its line shapes."""

import re
import smtplib

import pytest

from conftest import accepts_connections, free_port, wait_until, write_ini
from test_e2e import RelayProcess, stop_cleanly

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)"


@pytest.fixture
def go_relay(tmp_path):
    """Start the relay from an ini as the Go program's users write it
    (port from free_port: at these levels there is no "listening on" line)."""
    started = []

    def start(**options):
        port = free_port()
        ini = tmp_path / "smtprelay.ini"
        write_ini(ini, dict({"listen": "127.0.0.1:%d" % port, "hostname": "relay.example.com",
                             "logfile": "smtprelay.log", "allowed_recipients": r"@example\.org$",
                             "remotes": "file:outbox"}, **options))
        relay = RelayProcess(str(ini), str(tmp_path))
        started.append(relay)
        assert wait_until(lambda: accepts_connections(port) or relay.proc.poll() is not None, timeout=30)
        assert relay.proc.poll() is None, relay.stderr
        relay.port = port
        return relay

    yield start
    stop_cleanly(started)


def one_refusal_one_message(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("printer.lan")
        client.mail("scanner@example.org")
        assert client.rcpt("someone@elsewhere.test")[0] == 550
        assert client.rcpt("b@example.org")[0] == 250
        assert client.data(b"Subject: scan\r\n\r\npage\r\n")[0] == 250


def test_2_3_go_ini_log_level_warning_and_log_format_pretty(go_relay):
    relay = go_relay(log_level="warning", log_format="pretty")
    one_refusal_one_message(relay.port)
    assert relay.stop() == 0
    lines = relay.log_text("smtprelay.log").splitlines()
    # The file is no terminal: pretty is written without colour codes.
    assert len(lines) == 1 and "\x1b" not in lines[0]
    assert re.fullmatch(STAMP + r' WRN refused session=[0-9a-f]{8} port=\d+ peer=127\.0\.0\.1 id=[0-9a-f]+ '
                        r'reply="550 5\.7\.1 Recipient address not allowed" rcpt=someone@elsewhere\.test',
                        lines[0]), lines[0]


def test_2_3_go_ini_log_level_disabled_logs_nothing(go_relay):
    relay = go_relay(log_level="disabled")
    one_refusal_one_message(relay.port)
    assert relay.stop() == 0
    assert relay.log_text("smtprelay.log") == "" and relay.stderr == ""
