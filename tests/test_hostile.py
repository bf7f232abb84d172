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
from relay_lib.oauth import TokenError, TokenSource
from smtp_talk import Talk, write_users
from test_metrics import get
from test_proxy import ALLOWED, CLIENT, tlv, v1, v2


# -- the OAuth token endpoint (SPEC 10) -------------------------------------------

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
