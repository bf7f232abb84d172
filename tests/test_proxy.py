"""SPEC 12, PROXY protocol: the parser (fuzzed), raw v1 and v2 headers
written to the real relay over loopback, and a real HAProxy in front of it."""

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import free_port, outbox_messages, wait_until
from relay_lib import metrics
from relay_lib.inbound import proxy
from smtp_talk import Talk

CLIENT = "192.0.2.10"
ALLOWED = "192.0.2.0/24 2001:db8::/32"


def v1(src=CLIENT, sport=40000, dst="127.0.0.1", family="TCP4"):
    return ("PROXY %s %s %s %d 25\r\n" % (family, src, dst, sport)).encode()


def v2(src=CLIENT, sport=40000, dst="127.0.0.1", command=0x21, tlvs=b"", family=None, length=None):
    source, dest = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    payload = source.packed + dest.packed + struct.pack("!HH", sport, 25) + tlvs
    if family is None:
        family = 0x11 if source.version == 4 else 0x21
    return (proxy.V2_SIGNATURE + bytes([command, family])
            + struct.pack("!H", len(payload) if length is None else length) + payload)


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- the parser --------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    (v1(), (CLIENT, 40000)),
    (v1("2001:db8::7", family="TCP6", dst="::1"), ("2001:db8::7", 40000)),
    (b"PROXY UNKNOWN\r\n", proxy.LOCAL),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", proxy.LOCAL),
    (v2(), (CLIENT, 40000)),
    (v2("2001:db8::7", dst="::1"), ("2001:db8::7", 40000)),
    (v2(tlvs=tlv(0x05, b"unique-id") + tlv(0xEA, b"\x01vpce-0123")), (CLIENT, 40000)),
    (v2(command=0x20), proxy.LOCAL),
    (v2(family=0x00), proxy.LOCAL),
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-addresses", "v2-ipv4", "v2-ipv6",
        "v2-tlvs", "v2-local", "v2-unspec"])
def test_12_proxy_parser_reads_v1_and_v2(header, expected):
    assert proxy.header_length(header) == len(header)
    assert proxy.parse(header) == expected
    # Every prefix is either undecided or names the same length: a reader
    # that follows header_length never reads past the header.
    assert all(proxy.header_length(header[:n]) in (None, len(header)) for n in range(len(header)))


@pytest.mark.parametrize("header", [
    b"EHLO client.test\r\n",
    b"PROXY TCP4 192.0.2.10 127.0.0.1 40000\r\n",
    b"PROXY TCP4 2001:db8::1 127.0.0.1 40000 25\r\n",
    b"PROXY TCP6 192.0.2.10 ::1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.010 127.0.0.1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.10 127.0.0.1 70000 25\r\n",
    b"PROXY TCP4 192.0.2.10 127.0.0.1 -1 25\r\n",
    b"PROXY TCP4  192.0.2.10 127.0.0.1 40000 25\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 40000 25\r\n",
    b"PROXY UDP4 192.0.2.10 127.0.0.1 40000 25\r\n",
    b"PROXY " + b"A" * 120 + b"\r\n",
    v2(command=0x22),
    v2(command=0x11),
    v2(family=0x12),  # UDP over IPv4
    v2(family=0x31),  # AF_UNIX
    v2(family=0x21),  # says IPv6, carries IPv4 addresses
    v2(length=proxy.V2_MAX_PAYLOAD + 1),
    v2()[:-1],
    v2() + b"EHLO",
], ids=lambda h: repr(h[:24]))
def test_12_proxy_parser_refuses_malformed_headers(header):
    with pytest.raises(ValueError):
        proxy.parse(header)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda rest: proxy.V1_PREFIX + rest, st.binary(max_size=150)),
    st.builds(lambda words: ("PROXY " + " ".join(words) + "\r\n").encode(),
              st.lists(st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "192.0.2.1", "::1", "25", "",
                                        "65536", "0", "1.2.3.4.5", "\u0661"]), max_size=7)),
    st.builds(lambda head, length, payload: proxy.V2_SIGNATURE + head + struct.pack("!H", length) + payload,
              st.binary(min_size=2, max_size=2), st.integers(0, 65535), st.binary(max_size=300)),
))
def test_12_proxy_parser_fuzzed_never_fails_otherwise(data):
    """Any bytes: a bounded length, a result or ValueError; nothing else."""
    try:
        total = proxy.header_length(data)
    except ValueError:
        return
    assert total is None or 0 < total <= proxy.MAX_HEADER
    if total is None or total > len(data):
        return
    try:
        found = proxy.parse(data[:total])
    except ValueError:
        return
    if found is not proxy.LOCAL:
        address, port = found
        assert str(ipaddress.ip_address(address)) == address and 0 <= port <= 65535


# -- the relay behind a proxy --------------------------------------------------

@pytest.fixture
def proxied(relay_factory):
    """A relay that takes connections from 127.0.0.0/8 as a load balancer's."""
    def start(**options):
        merged = dict(proxy_nets="127.0.0.0/8", allowed_nets=ALLOWED)
        merged.update(options)
        return relay_factory(**merged)
    return start


def _mail(talk):
    assert talk.cmd("EHLO printer.lan").startswith("250-relay.test")
    assert talk.to_data() == "354 End data with <CR><LF>.<CR><LF>"
    return talk.cmd("Subject: proxied\r\n\r\nHello.\r\n.")


def _last_message(relay):
    meta, content = outbox_messages(relay.outbox)[-1]
    return meta, content


@pytest.mark.parametrize("header, client", [
    (v1(), CLIENT),
    (v2("2001:db8::7", dst="::1"), "2001:db8::7"),
    (v2(tlvs=tlv(0x05, b"x" * 300)), CLIENT),
], ids=["v1", "v2-ipv6", "v2-tlvs"])
def test_12_proxy_header_client_address_drives_the_session(proxied, webhook, relay_log, header, client):
    relay = proxied(webhook_url=webhook.url)
    with Talk(relay.port) as t:
        t.send(header)
        assert t.reply().startswith("220 ")
        assert _mail(t).startswith("250 2.0.0 OK ")
    meta, content = _last_message(relay)
    assert meta["peer"] == client
    assert content.startswith(b"Received: from printer.lan ([%s])" % client.encode())
    assert webhook.requests[0].json["peer"] == client
    assert [r.fields["peer"] for r in relay_log.records if r.getMessage() == "message"] == [client]


def test_12_proxy_header_client_outside_allowed_nets_gets_554(proxied, relay_log):
    relay = proxied()
    with Talk(relay.port) as t:
        t.send(v1("198.51.100.7"))
        assert t.reply() == "554 5.7.1 Access denied"
        assert t.closed()
    assert any(r.getMessage() == "connection refused: address not in allowed_nets"
               and r.fields["peer"] == "198.51.100.7" for r in relay_log.records)


@pytest.mark.parametrize("allowed, greeting", [
    ("127.0.0.0/8", "220 "), (ALLOWED, "554 5.7.1 Access denied")], ids=["proxy-allowed", "proxy-not-allowed"])
def test_12_proxy_v2_local_keeps_the_proxy_address(proxied, allowed, greeting):
    relay = proxied(allowed_nets=allowed)
    with Talk(relay.port) as t:
        t.send(v2(command=0x20))
        assert t.reply().startswith(greeting)
        if greeting == "220 ":
            _mail(t)
            assert _last_message(relay)[0]["peer"] == "127.0.0.1"


HOSTILE = [  # (bytes, whether the proxy then waits instead of closing its side)
    (b"EHLO client.test\r\n", True),
    (b"PROXY TCP4 192.0.2.10 127.0.0.1 40000\r\n", True),
    (b"PROXY " + b"A" * 200, True),
    (v2(family=0x31), True),
    (v2(family=0x12), True),
    (v2(command=0x23), True),
    (v2(length=60000), True),
    (v2()[:20], False),
    (b"PROXY TCP4 192.0.2.10", False),
]


def test_12_proxy_bad_header_closes_without_reply_and_frees_the_slot(proxied, relay_log):
    relay = proxied(max_connections=1)
    refused_before = metrics.CONNECTIONS_REFUSED.labels("proxy_header").value()
    for data, whole in HOSTILE:
        with Talk(relay.port) as t:
            t.send(data)
            if not whole:
                t.sock.shutdown(socket.SHUT_WR)  # the proxy gives up half way
            assert t.closed() and t.buf == b"", data
        assert wait_until(lambda: relay.active_sessions == 0), data
    closed = [r for r in relay_log.records if r.getMessage() == "connection closed: no valid PROXY header"]
    assert len(closed) == len(HOSTILE)
    assert metrics.CONNECTIONS_REFUSED.labels("proxy_header").value() - refused_before == len(HOSTILE)
    with Talk(relay.port) as t:  # the one slot is free again
        t.send(v1())
        assert t.reply().startswith("220 ")


def test_12_proxy_silent_proxy_times_out_and_frees_the_slot(proxied, relay_log):
    relay = proxied(max_connections=1, read_timeout="1s")
    with Talk(relay.port) as t:
        started = time.monotonic()
        assert wait_until(t.closed, 5) and t.buf == b""
        assert time.monotonic() - started >= 0.9
    assert wait_until(lambda: relay.active_sessions == 0)
    closed = [r.fields for r in relay_log.records if r.getMessage() == "connection closed: no valid PROXY header"]
    assert closed and "read" in closed[0]["reason"]


def test_12_proxy_line_from_elsewhere_is_an_unknown_command(relay_factory):
    relay = relay_factory()  # no proxy_nets
    with Talk(relay.port) as t:
        assert t.reply().startswith("220 ")
        assert t.cmd(v1().decode().strip()) == "500 5.5.2 Command unrecognized"


def test_12_proxy_header_only_as_the_first_bytes(proxied):
    relay = proxied()
    with Talk(relay.port) as t:
        t.send(v1())
        assert t.reply().startswith("220 ")
        assert t.cmd(v1("192.0.2.99").decode().strip()) == "500 5.5.2 Command unrecognized"
        _mail(t)
    assert _last_message(relay)[0]["peer"] == CLIENT


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_12_proxy_header_comes_before_tls(proxied, certs, header):
    relay = proxied(listen="tls://127.0.0.1:0", local_cert=certs.cert_path, local_key=certs.key_path)
    with Talk(relay.port) as t:
        t.send(header)
        t.sock = certs.client_context().wrap_socket(t.sock, server_hostname="localhost")
        assert t.reply().startswith("220 ")
        _mail(t)
    meta, content = _last_message(relay)
    assert meta["peer"] == CLIENT and meta["tls"] is True
    assert content.startswith(b"Received: from printer.lan ([192.0.2.10])")


def test_12_proxy_tls_refusal_after_the_header(proxied, certs):
    relay = proxied(listen="tls://127.0.0.1:0", local_cert=certs.cert_path, local_key=certs.key_path)
    with Talk(relay.port) as t:
        t.send(v2("198.51.100.7"))
        t.sock = certs.client_context().wrap_socket(t.sock, server_hostname="localhost")
        assert t.reply() == "554 5.7.1 Access denied"


# -- a real HAProxy in front ----------------------------------------------------

HAPROXY = shutil.which("haproxy", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                         "/usr/local/sbin"]))
HAPROXY_CONFIG = """global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:%(front)d
    default_backend relays
backend relays
    server relay1 127.0.0.1:%(relay)d send-proxy-v2
"""


@pytest.fixture
def haproxy(tmp_path):
    if HAPROXY is None:
        pytest.skip("the haproxy program is not installed (Debian/Ubuntu: apt-get install haproxy)")
    started = []

    def start(relay_port):
        front = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(HAPROXY_CONFIG % {"front": front, "relay": relay_port})
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        started.append(process)
        listening = wait_until(lambda: process.poll() is not None or _listens(front), 10)
        assert listening and process.poll() is None, process.stderr.read().decode(errors="replace")
        return front

    yield start
    for process in started:
        process.terminate()
        process.wait(10)
        process.stderr.close()


def _listens(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_12_proxy_real_haproxy_send_proxy_v2(proxied, haproxy, relay_log):
    # The client connects from 127.0.0.2, HAProxy from 127.0.0.1: the
    # relay sees the client only through the header.
    relay = proxied(proxy_nets="127.0.0.1/32", allowed_nets="127.0.0.2/32")
    front = haproxy(relay.port)
    with Talk(relay.port) as direct:  # not through HAProxy: no header, closed
        direct.send(b"EHLO client.test\r\n")
        assert direct.closed() and direct.buf == b""
    with Talk(front, source="127.0.0.2") as t:
        assert t.reply().startswith("220 ")
        assert _mail(t).startswith("250 2.0.0 OK ")
    meta, content = _last_message(relay)
    assert meta["peer"] == "127.0.0.2"
    assert content.startswith(b"Received: from printer.lan ([127.0.0.2])")
