"""Wire framing over a socketpair (SPEC 3.2 limits, 3.3 DATA): each case fed
whole, in small chunks and byte by byte, h11-style, plus timeouts, reply
batching and the STARTTLS buffer drop."""

import socket
import ssl
import threading
import time

import pytest

from relay_lib import replies
from relay_lib.inbound import wire
from relay_lib.inbound.wire import Closed, LineTooLong, Timeout, Wire


@pytest.fixture
def pair():
    """(Wire on the server end, the client socket)."""
    server, client = socket.socketpair()
    w = Wire(server, read_timeout=2.0, write_timeout=2.0, data_timeout=2.0)
    client.settimeout(5)
    yield w, client
    w.close()
    client.close()


@pytest.fixture(params=[None, 1, 2, 7], ids=["whole", "byte-by-byte", "chunks-of-2", "chunks-of-7"])
def chunking(request, monkeypatch):
    """Make the Wire receive in tiny pieces, so every split point is tried."""
    if request.param is not None:
        monkeypatch.setattr(wire, "LINE_RECV_SIZE", request.param)
        monkeypatch.setattr(wire, "DATA_RECV_SIZE", request.param)
    return request.param


def feed(client, data):
    """Send from a thread, so the sender never blocks on a full socket buffer."""
    thread = threading.Thread(target=client.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


# (what the client sends after the 354, the body the relay keeps)
DATA_CASES = [
    (b"hello\r\n.\r\n", b"hello\r\n"),
    (b".\r\n", b""),
    (b"..dot\r\n.\r\n", b".dot\r\n"),
    (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
    (b"a\r\n...\r\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n"),
    (b"line one\r\nline two\r\n.\r\n", b"line one\r\nline two\r\n"),
    # SMTP smuggling (CVE-2023-51764): none of these ends the message, and
    # every line end comes out as CRLF.
    (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
    (b"bare\rcr\r\n.\r\n", b"bare\r\ncr\r\n"),
    (b"\x00\xff binary\r\n.\r\n", b"\x00\xff binary\r\n"),
]


@pytest.mark.parametrize("sent, body", DATA_CASES, ids=[repr(c[0])[:30] for c in DATA_CASES])
def test_3_3_data_framing(pair, chunking, sent, body):
    w, client = pair
    feed(client, sent + b"QUIT\r\n").join()
    got, size = w.read_data(1000)
    assert got == body
    assert w.read_line() == b"QUIT"


def test_3_3_data_trailing_bytes_stay_buffered(pair, chunking):
    w, client = pair
    feed(client, b"one\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert w.read_data(1000)[0] == b"one\r\n"
    assert w.read_line() == b"MAIL FROM:<a@b>"
    assert w.read_line() == b"RCPT TO:<c@d>"


def test_3_3_data_too_big_is_read_to_the_end(pair, chunking):
    w, client = pair
    big = b"x" * 78 + b"\r\n"
    feed(client, big * 50 + b".\r\nNOOP\r\n")
    body, size = w.read_data(1000)
    assert body is None
    assert size >= 4000
    assert w.read_line() == b"NOOP"


def test_3_3_data_just_under_the_limit_is_kept(pair):
    w, client = pair
    feed(client, b"x" * 998 + b"\r\n.\r\n")
    body, size = w.read_data(1000)
    assert body == b"x" * 998 + b"\r\n" and size == 1000


def test_3_3_data_too_big_keeps_no_memory(pair):
    w, client = pair
    sender = feed(client, b"y" * (4 * 1024 * 1024) + b"\r\n.\r\n")
    body, _ = w.read_data(1000)
    sender.join()
    assert body is None
    assert len(w._buf) == 0


def test_3_3_data_many_messages_pipelined(pair):
    w, client = pair
    feed(client, b"".join(b"msg %d\r\n.\r\n" % i for i in range(100)))
    for i in range(100):
        assert w.read_data(1000)[0] == b"msg %d\r\n" % i


def test_3_2_data_timeout_covers_the_whole_body(pair):
    w, client = pair
    w.data_timeout = 0.3
    client.sendall(b"partial body\r\n")
    started = time.monotonic()
    with pytest.raises(Timeout):
        w.read_data(1000)
    assert time.monotonic() - started < 2


def test_3_2_read_line_crlf_and_bare_lf(pair, chunking):
    w, client = pair
    feed(client, b"EHLO a\r\nNOOP\nRSET\r\n")
    assert [w.read_line() for _ in range(3)] == [b"EHLO a", b"NOOP", b"RSET"]


def test_3_2_line_of_4096_octets_is_accepted(pair):
    w, client = pair
    line = b"N" * 4096
    feed(client, line + b"\r\n" + line + b"\n")
    assert w.read_line() == line
    assert w.read_line() == line


def test_3_2_line_of_4097_octets_is_too_long(pair, chunking):
    w, client = pair
    feed(client, b"N" * 4097 + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        w.read_line()
    assert w.read_line() == b"NOOP"


def test_3_2_100kb_line_is_drained_without_buffering(pair):
    w, client = pair
    feed(client, b"A" * 100 * 1024 + b"\r\nQUIT\r\n")
    with pytest.raises(LineTooLong):
        w.read_line()
    assert len(w._buf) <= len(b"QUIT\r\n")
    assert w.read_line() == b"QUIT"


def test_3_2_read_timeout_is_a_deadline_for_the_whole_line(pair):
    """A client that trickles one byte at a time does not reset the timer."""
    w, client = pair
    w.read_timeout = 0.5
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.05):  # pacing the slow client, not waiting on the relay
            try:
                client.send(b"x")
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    with pytest.raises(Timeout):
        w.read_line()
    stop.set()
    thread.join()
    assert time.monotonic() - started < 1.5


def test_3_2_peer_close_is_closed(pair):
    w, client = pair
    client.sendall(b"NOO")
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(Closed):
        w.read_line()


def test_3_2_interrupt_wakes_a_blocked_read(pair):
    w, client = pair
    errors = []

    def reader():
        try:
            w.read_line()
        except Closed as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    w.interrupt()
    thread.join(5)
    assert errors and not thread.is_alive()
    w.write(replies.SHUTTING_DOWN)  # the write side still works
    assert client.recv(100) == b"421 4.3.2 Shutting down\r\n"


def test_3_2_pipelined_replies_are_sent_in_one_batch(pair):
    w, client = pair
    client.sendall(b"NOOP\r\nNOOP\r\n")
    client.setblocking(False)
    assert w.read_line() == b"NOOP"
    w.write(replies.OK)
    with pytest.raises(BlockingIOError):
        client.recv(100)  # held: more input is waiting
    assert w.read_line() == b"NOOP"
    w.write(replies.OK)
    client.setblocking(True)
    got = b""
    while len(got) < 28:
        got += client.recv(100)
    assert got == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"


def test_3_2_held_replies_are_bounded(pair):
    """A flood of pipelined commands does not pile up replies in memory."""
    w, client = pair
    client.sendall(b"NOOP\r\n" * 10000)
    for _ in range(6000):
        w.read_line()
        w.write(replies.OK)
    assert w.has_buffered()
    assert w._held <= wire.MAX_HELD
    client.close()  # a client that never reads; the relay must not wait for it


def test_3_2_held_replies_go_out_before_a_blocking_read(pair):
    w, client = pair
    client.sendall(b"NOOP\r\nNO")
    assert w.read_line() == b"NOOP"
    w.write(replies.OK)  # held: a partial line is buffered
    result = []
    thread = threading.Thread(target=lambda: result.append(w.read_line()))
    thread.start()
    assert client.recv(100) == b"250 2.0.0 OK\r\n"  # flushed before blocking
    client.sendall(b"OP\r\n")
    thread.join(5)
    assert result == [b"NOOP"]


def test_3_2_write_timeout(pair):
    """A client that stops reading cannot hold the session past write_timeout."""
    w, client = pair
    w.write_timeout = 0.3
    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    started = time.monotonic()
    with pytest.raises(Timeout):
        w.write(replies.Reply(250, "2.0.0", "x" * 4 * 1024 * 1024))
    assert time.monotonic() - started < 2


def test_3_2_multiline_replies_use_crlf(pair):
    w, client = pair
    w.write(replies.ehlo("relay.test", ["PIPELINING", "8BITMIME"]))
    assert client.recv(100) == b"250-relay.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def test_3_2_starttls_drops_pipelined_plaintext(pair, certs):
    """CVE-2011-0411: bytes after STARTTLS in the same read never run under TLS."""
    w, client = pair
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_path, certs.key_path)
    injected = b"MAIL FROM:<evil@example.com>\r\n"
    client.sendall(b"STARTTLS\r\n" + injected)
    assert w.read_line() == b"STARTTLS"
    w.write(replies.READY_TLS)  # held: the injected line is buffered
    tls_client = []

    def handshake():
        assert client.recv(100) == b"220 2.0.0 Ready to start TLS\r\n"
        tls_client.append(certs.client_context().wrap_socket(client, server_hostname="localhost"))
        tls_client[0].sendall(b"EHLO after\r\n")

    thread = threading.Thread(target=handshake)
    thread.start()
    assert w.start_tls(server_ctx) == len(injected)
    thread.join(5)
    assert w.read_line() == b"EHLO after"
    version, cipher = w.tls_info()
    assert version.startswith("TLS") and cipher
    tls_client[0].close()


def test_3_1_tls_handshake_timeout(pair, certs):
    w, client = pair
    w.read_timeout = 0.3
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_path, certs.key_path)
    with pytest.raises(Timeout):
        w.start_tls(server_ctx)  # the client never says hello


def test_3_1_tls_handshake_garbage_is_closed(pair, certs):
    w, client = pair
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_path, certs.key_path)
    client.sendall(b"EHLO this is not tls\r\n" * 20)
    with pytest.raises(Closed):
        w.start_tls(server_ctx)
