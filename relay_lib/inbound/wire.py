"""The client connection as SMTP sees it: command lines, message bodies, replies.

Owns the socket of one session and its read buffer (built on the raw socket,
not `makefile`, so STARTTLS can drop every buffered byte), every per-operation
timeout, and TLS upgrades. Must not know what a command means: `session.py`
decides that and hands back `Reply` values.

Theory of operation: bytes are received in large chunks into one bytearray and
searched with `bytes.find`, so the cost per message is a few C-level passes
over the data rather than Python work per line. Replies are queued and sent
with one `sendall` when no more pipelined input is buffered [R2920 3.1], and
always before the next blocking read, so a client never waits on a reply that
is held back.
"""

import re
import socket
import ssl
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

from relay_lib.inbound import proxy
from relay_lib.replies import Reply

MAX_LINE = 4096  # SPEC 3.2 (RFC 5321 4.5.3.1.4 asks for at least 512)
# recv(n) allocates n bytes and then shrinks the result. Past glibc's mmap
# threshold (128 KiB) that is an mmap, mremap and munmap for every read, so
# both sizes stay below it. Command reads ask for little (a pipelined
# transaction fits); body reads for more, so a 100 KB message takes few reads.
LINE_RECV_SIZE = 16 * 1024
DATA_RECV_SIZE = 64 * 1024
IDLE_SLICE = 1.0  # seconds; how often a blocked read checks for interrupt()
# Held replies are sent once they reach this size even if input is still
# buffered, so a client that pipelines a flood of cheap commands cannot make
# the relay hold megabytes of answers.
MAX_HELD = 64 * 1024

# On Linux a plain connection runs as a blocking socket whose kernel
# timeouts (SO_RCVTIMEO, SO_SNDTIMEO) bound each recv and send: one system
# call per operation. With settimeout(), CPython polls before every recv and
# send, which doubles the system calls and the GIL hand-offs per message.
# Windows leaves a socket undefined after such a timeout, and TLS sockets
# need CPython's own timeout handling, so both keep settimeout().
KERNEL_TIMEOUTS = sys.platform.startswith("linux")

# Any line end a client may have sent inside a body, made CRLF on the way out.
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class WireError(Exception):
    """The connection cannot go on as an SMTP session."""


class Timeout(WireError):
    """A read or write took longer than its limit (answer 421 4.4.2)."""


class Closed(WireError):
    """The peer went away, or the socket failed underneath us."""


class NoTLS(Closed):
    """The peer closed before sending a byte of TLS (a TCP health check)."""


class LineTooLong(Exception):
    """A command line was over MAX_LINE octets; the rest of it was dropped.

    The connection is still in step: answer 500 5.5.2 and read the next line.
    """


class Wire:
    """One client connection: framed reads, batched replies, timeouts, TLS.

    Methods for the caller: read_proxy_header(), read_line(), read_data(),
    write(), flush(), start_tls(), tls_info(), has_buffered(), interrupt(),
    close().
    """

    def __init__(self, sock: socket.socket, read_timeout: float,
                 write_timeout: float, data_timeout: float):
        self.sock = sock
        try:
            # Replies are already batched into one write; never let Nagle
            # hold the last one back waiting for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests): nothing to tune
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.data_timeout = data_timeout
        self._buf = bytearray()
        self._out: List[bytes] = []
        self._held = 0  # octets in _out
        self._interrupted = False
        # settimeout() is a system call (an ioctl) and the read and write
        # timeouts alternate for every command: only call it on a change.
        self._timeout: Optional[float] = sock.gettimeout()
        # See KERNEL_TIMEOUTS; the kernel timeouts last set, by option.
        self._kernel_timeouts = KERNEL_TIMEOUTS and not isinstance(sock, ssl.SSLSocket)
        self._kernel_limits: Dict[int, float] = {}
        if self._kernel_timeouts and self._timeout is not None:
            sock.settimeout(None)
            self._timeout = None

    # ---- reading ---------------------------------------------------------

    def has_buffered(self) -> bool:
        """True when pipelined input is waiting to be read."""
        return bool(self._buf)

    def read_proxy_header(self) -> proxy.Result:
        """The PROXY protocol header (SPEC 12): the first bytes, all within
        read_timeout. Returns proxy.parse's (address, port) or proxy.LOCAL.

        Bytes are peeked before they are taken, so not one byte past the
        header is consumed: on tls:// listeners the TLS handshake follows.

        Raises:
            ValueError: not a well-formed header.
            Timeout, Closed.
        """
        deadline = time.monotonic() + self.read_timeout
        header = b""
        while True:
            total = proxy.header_length(header)
            if total is not None and len(header) >= total:
                return proxy.parse(header)
            seen = self._receive(deadline, proxy.MAX_HEADER, socket.MSG_PEEK)
            total = proxy.header_length(header + seen)
            # Unknown length: every byte seen so far belongs to the header.
            header += self._receive(deadline, len(seen) if total is None else total - len(header))

    def read_line(self) -> bytes:
        """The next command line without its line end.

        The whole line must arrive within read_timeout (a client that trickles
        bytes does not reset it). A bare LF ends a command line too, as in
        Postfix; only DATA is strict about CRLF.

        Raises:
            LineTooLong: the line had more than MAX_LINE octets (already
                drained; the session can answer and go on).
            Timeout, Closed.
        """
        deadline = time.monotonic() + self.read_timeout
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > MAX_LINE:
                    raise LineTooLong()
                return line
            if len(buf) > MAX_LINE + 1:  # + 1: room for the CR of the CRLF
                buf.clear()
                self._drain_line(deadline)
                raise LineTooLong()
            start = len(buf)
            self._fill(deadline)

    def _drain_line(self, deadline: float) -> None:
        """Receive and drop bytes up to the next LF, keeping what follows it."""
        buf = self._buf
        while True:
            self._fill(deadline)
            end = buf.find(b"\n")
            if end >= 0:
                del buf[:end + 1]
                return
            buf.clear()

    def read_data(self, max_size: int) -> Tuple[Optional[bytes], int]:
        """Read one message body after the 354 reply, up to CRLF.CRLF.

        Returns (body, size): body with dots unstuffed [R5321 4.5.2] and every
        line end made CRLF, or None when the message was bigger than max_size
        (then it was read to its end but not kept, SPEC 3.3). size is the
        number of octets received (an estimate once past the limit).
        The whole body must arrive within data_timeout.

        Raises:
            Timeout, Closed.
        """
        deadline = time.monotonic() + self.data_timeout
        # The CRLF that ended the DATA command starts the first line, so a
        # body that is just ".\r\n" ends at once and a leading dot is
        # unstuffed like any other.
        data = bytearray(b"\r\n")
        data += self._buf
        self._buf.clear()
        dropped = 0  # octets received and discarded past max_size
        stuffed = False  # a line before the end starts with a dot
        scan = 0
        while True:
            # Every CRLF followed by a dot either ends the message (a line
            # of just "." [R5321 4.1.1.4]) or starts a dot-stuffed line
            # [R5321 4.5.2]: one search finds both, so the body is scanned
            # once for them. Only CRLF counts as a line end here; a dot
            # framed by bare LF or CR is content (SMTP smuggling,
            # CVE-2023-51764/51765/51766).
            hit = data.find(b"\r\n.", scan)
            if 0 <= hit <= len(data) - 5:
                if data.startswith(b"\r\n", hit + 3):
                    end = hit
                    break
                stuffed = True
                scan = hit + 3
                continue
            # Undecided: wait for more bytes, then search again from the hit
            # or from where a "\r\n." split by the read could begin.
            if (dropped or len(data) - 2 > max_size) and len(data) > 4:
                # Too big: keep only a tail long enough to hold a split
                # terminator, so memory stays bounded whatever the client sends.
                dropped += len(data) - 4
                del data[:-4]
                scan = 0
            else:
                scan = hit if hit >= 0 else max(0, len(data) - 2)
            data += self._receive(deadline, DATA_RECV_SIZE)
        self._buf = data[end + 5:]  # pipelined commands after the dot
        if dropped:
            return None, dropped + end
        stop = end + 2  # the CRLF before the dot ends the last line
        # A line end other than CRLF (a bare CR or LF) is made CRLF below;
        # counted on the buffer in place, before any copy.
        crlf = data.count(b"\r\n", 2, stop)
        bare_eol = crlf != data.count(b"\n", 2, stop) or crlf != data.count(b"\r", 2, stop)
        with memoryview(data) as view:
            if stuffed:
                body = bytes(view[:stop]).replace(b"\r\n.", b"\r\n")[2:]
            else:
                body = bytes(view[2:stop])  # the usual case: the one copy
        size = len(body)
        if size > max_size:  # the whole message came in before the check above
            return None, size
        if bare_eol:
            body = _ANY_EOL.sub(b"\r\n", body)
        return body, size

    def _fill(self, deadline: float) -> None:
        """Block until more command bytes arrive and add them to the buffer."""
        self._buf += self._receive(deadline, LINE_RECV_SIZE)

    def _receive(self, deadline: float, size: int, flags: int = 0) -> bytes:
        """Send queued replies, then block until up to `size` bytes arrive."""
        self.flush()
        while True:
            self._wait_turn(deadline)
            try:
                chunk = self.sock.recv(size, flags)
            except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                continue
            except OSError as exc:
                raise Closed(str(exc)) from exc
            if not chunk:
                raise Closed("interrupted" if self._interrupted else "peer closed")
            return chunk

    def _wait_turn(self, deadline: float) -> None:
        """Before each blocking read: check interrupt() and the deadline, and
        bound the read by IDLE_SLICE so an interrupt is noticed."""
        if self._interrupted:
            raise Closed("interrupted")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout("read")
        if self._kernel_timeouts:
            self._set_kernel_limit(socket.SO_RCVTIMEO, min(remaining, IDLE_SLICE))
        else:
            self._set_timeout(min(remaining, IDLE_SLICE))

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    def _set_kernel_limit(self, option: int, seconds: float) -> None:
        """Set SO_RCVTIMEO or SO_SNDTIMEO when it changes (struct timeval)."""
        if self._kernel_limits.get(option) != seconds:
            whole = int(seconds)
            # At least 1 microsecond: a zero timeval would mean "wait forever".
            micro = max(int((seconds - whole) * 1e6), 0 if whole else 1)
            self.sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, micro))
            self._kernel_limits[option] = seconds

    # ---- writing ---------------------------------------------------------

    def write(self, reply: Reply) -> None:
        """Queue a reply; it goes out when no more pipelined input waits.

        Raises:
            Timeout, Closed (only when the queue is flushed now).
        """
        line = reply.line()
        self._out.append(line)
        self._held += len(line)
        if not self._buf or self._held > MAX_HELD:
            self.flush()

    def flush(self) -> None:
        """Send every queued reply in one write, within write_timeout.

        Raises:
            Timeout, Closed.
        """
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        self._held = 0
        try:
            if self._kernel_timeouts:
                self._send_kernel_timed(data)
            else:
                self._send_polled(data)
        except socket.timeout as exc:
            raise Timeout("write") from exc
        except OSError as exc:
            raise Closed(str(exc)) from exc

    def _send_kernel_timed(self, data: bytes) -> None:
        """Send on a blocking socket, each send() bounded by SO_SNDTIMEO."""
        deadline = time.monotonic() + self.write_timeout
        limit = self.write_timeout
        view = memoryview(data)
        while True:
            self._set_kernel_limit(socket.SO_SNDTIMEO, limit)
            try:
                sent = self.sock.send(view)
            except BlockingIOError:  # SO_SNDTIMEO expired
                raise Timeout("write") from None
            if sent == len(view):
                return
            view = view[sent:]
            limit = deadline - time.monotonic()
            if limit <= 0:
                raise Timeout("write")

    def _send_polled(self, data: bytes) -> None:
        """Send under settimeout(), within write_timeout in total."""
        started = time.monotonic()
        if self._timeout and self._timeout <= self.write_timeout:
            # The socket still carries the read slice, which is within
            # the write limit: try one send() without changing it (saves
            # two settimeout calls per reply). A batch of replies nearly
            # always fits the socket buffer at once.
            try:
                sent = self.sock.send(data)
            except socket.timeout:
                sent = 0  # the client is not reading: wait the full limit below
            if sent == len(data):
                return
            data = data[sent:]
        remaining = self.write_timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise Timeout("write")
        self._set_timeout(remaining)
        self.sock.sendall(data)

    # ---- TLS and lifecycle -------------------------------------------------

    def start_tls(self, context: ssl.SSLContext) -> int:
        """Flush replies, drop buffered input, and run a server TLS handshake.

        Returns the number of buffered plaintext octets dropped: anything the
        client pipelined after STARTTLS must never run under TLS
        (CVE-2011-0411). The handshake must finish within read_timeout.

        Raises:
            NoTLS: the peer closed without sending anything.
            Timeout, Closed (handshake failures included).
        """
        self.flush()
        dropped = len(self._buf)
        self._buf = bytearray()
        self._kernel_timeouts = False  # see KERNEL_TIMEOUTS: TLS needs CPython's timeouts
        self._set_timeout(self.read_timeout)
        try:
            # A peek tells a client that sent nothing at all (a health check
            # that connects and closes) from a failed handshake.
            if not self.sock.recv(1, socket.MSG_PEEK):
                raise NoTLS("closed before TLS")
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except socket.timeout as exc:
            raise Timeout("tls handshake") from exc
        except (OSError, ValueError) as exc:
            raise Closed("tls handshake: %s" % exc) from exc
        return dropped

    def tls_info(self) -> Optional[Tuple[str, str]]:
        """(version, cipher) of the TLS layer, or None on a plain connection."""
        if not isinstance(self.sock, ssl.SSLSocket):
            return None
        cipher = self.sock.cipher()
        return (self.sock.version() or "", cipher[0] if cipher else "")

    def interrupt(self) -> None:
        """Make a blocked or future read fail with Closed (used at shutdown).

        A plain socket has its read side shut, which wakes the read at once;
        the final reply can still be written. Under TLS that would break the
        TLS stream (the client would get an alert, not the 421), so there the
        blocked read notices the flag within IDLE_SLICE.
        """
        self._interrupted = True
        if isinstance(self.sock, ssl.SSLSocket):
            return
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass  # already closed by the peer: the read fails on its own

    def close(self) -> None:
        """Close the socket; errors on the way out do not matter any more."""
        try:
            self.flush()
        except WireError:
            pass  # the peer is gone; nothing left to tell it
        try:
            # A FIN first, so the last reply is not lost to a reset.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass  # the peer reset the connection first
        try:
            self.sock.close()
        except OSError:
            pass  # the peer reset the connection first
