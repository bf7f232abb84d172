"""SPEC 3.2, 7 and 12 under attack: hostile clients of the metrics endpoint,
PROXY headers cut, stalled or followed at once by SMTP, AUTH with absurd
passwords, a token endpoint that trickles or answers nonsense, config files
with odd bytes, a regex Python's backtracking cannot match in time, and a
HELO full of escape sequences. Real sockets, real relays, real processes.

Each test also checks what the promise is about: a clear reply, the next
client served, no slot or thread left behind, nothing unbounded logged.
"""

import base64
import http.client
import http.server
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import tracemalloc

import pytest

from conftest import Trickle, outbox_messages, relay_command, wait_until, write_ini
from relay_lib import config, logs, metrics_http
from relay_lib.oauth import MAX_LIFETIME, TokenError, TokenSource
from smtp_talk import Talk, write_users
from test_metrics import get
from test_proxy import ALLOWED, CLIENT, tlv, v1, v2


# -- the OAuth token endpoint (SPEC 10) -------------------------------------------

class Answering:
    """A token endpoint on loopback that answers every POST with `body`, or
    with `size` octets of JSON-looking filler sent as fast as the client reads."""

    def __init__(self, body=b"", size=0):
        answering = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(answering.size or len(answering.body)))
                self.end_headers()
                try:
                    if answering.size:
                        chunk = b" " * 65536
                        for _ in range(answering.size // len(chunk)):
                            self.wfile.write(chunk)
                    else:
                        self.wfile.write(answering.body)
                except OSError:
                    pass  # the relay stopped reading, as it should

            def log_message(self, fmt, *args):
                pass

        self.body, self.size = body, size
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/token" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def answering():
    started = []

    def start(**kw):
        started.append(Answering(**kw))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.stop()


def source_for(url, timeout=2.0):
    return TokenSource(url, "client-id", "client-Secret-1", "scope", None, timeout=timeout)


def test_10_trickled_token_answer_is_cut_at_remote_timeout():
    trickle = Trickle(gap=0.1)  # 250 octets, one every 0.1 s: each read is quick, the whole is not
    try:
        started = time.monotonic()
        with pytest.raises(TokenError, match=r"^token endpoint timed out after 0\.5s$"):
            source_for(trickle.url, timeout=0.5).get()
        assert time.monotonic() - started < 1.5
    finally:
        trickle.stop()


def test_10_100_mb_token_answer_is_read_no_further_than_64_kb(answering):
    endpoint = answering(size=100 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(TokenError, match="not JSON"):
            source_for(endpoint.url).get()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


@pytest.mark.parametrize("expires_in, lifetime", [
    (b"-5", 1), (b"0", 1), (b'"3600"', 3600), (b'"soon"', 3600), (b"NaN", 3600),
    (b"Infinity", 3600), (b"1e999", 3600), (b"1" + b"0" * 400, MAX_LIFETIME), (b"[1]", 3600),
], ids=["negative", "zero", "string", "word", "nan", "infinity", "1e999", "huge", "list"])
def test_10_odd_expires_in_gives_a_bounded_lifetime(answering, expires_in, lifetime):
    endpoint = answering(body=b'{"access_token": "tok-123", "expires_in": %s}' % expires_in)
    token, fetched = source_for(endpoint.url).get()
    assert fetched and token.access_token == "tok-123" and token.expires_in == lifetime
    assert token.renew_at <= token.expires_at < time.monotonic() + MAX_LIFETIME + 1


@pytest.mark.parametrize("token", ["tok\r\nQUIT", "tok\x01auth=Bearer x", "tok en", "t\u00f6k", "tok\x1b[2J"],
                         ids=["crlf", "sasl-separator", "space", "non-ascii", "ansi"])
def test_10_access_token_with_control_characters_is_refused(answering, relay_log, token):
    endpoint = answering(body=json.dumps({"access_token": token, "expires_in": 3600}).encode())
    with pytest.raises(TokenError) as caught:
        source_for(endpoint.url).get()
    assert str(caught.value) == "token endpoint answered an access_token that is not printable ASCII"
    assert not any(token in repr(r.__dict__) for r in relay_log.records)
