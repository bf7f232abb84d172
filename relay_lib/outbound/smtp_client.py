"""One smtplib connection to a remote, with the manners SPEC 5.3 asks of it:
each whole reply within remote_timeout (not each read), a fast and named
failure when the remote's TLS mode is not the URL's, kernel timeouts on plain
Linux sockets.

Owns the smtplib subclasses `Client` and `ClientTLS` and `SetupFailed`. Must
not pool, authenticate or send mail: `dispatcher` does that over these.
"""

import select
import smtplib
import socket
import ssl
import struct
import sys
import time
from typing import Tuple, Union

# Plain connections on Linux: kernel send/receive timeouts, as in wire.py.
KERNEL_TIMEOUTS = sys.platform.startswith("linux")
# A remote silent this long after connecting (and at most half of
# remote_timeout) is asked for a TLS handshake: a greeting that never comes
# is what a smtp:// or starttls:// remote that wants implicit TLS looks like.
GREETING_PROBE = 10.0
# Port 25 servers may delay their greeting on purpose (Postfix postscreen,
# tarpits) and block a client that speaks first: never probe there.
NO_GREETING_PROBE_PORTS = (25,)
_MAX_REPLY_LINE = 8192  # as smtplib's _MAXLINE
# What OpenSSL says when a "TLS" server answers in plain text (an SMTP greeting).
_PLAIN_TEXT_ANSWERS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                       "UNKNOWN_PROTOCOL", "HTTP_REQUEST")


class SetupFailed(smtplib.SMTPException):
    """Greeting, EHLO, STARTTLS or AUTH towards a remote failed, with the
    reply it gave (`code` 0 when it gave none). Stays inside outbound: the
    dispatcher turns it into a Failure (SPEC 4.1: never a bounce).
    """

    def __init__(self, detail: str, code: int = 0, raw: Union[bytes, str] = b""):
        super().__init__(detail)
        self.code, self.raw = code, raw


class _ReplyReader:
    """Whole replies from one socket, each within one deadline.

    Replaces smtplib's buffered file: its timeout bounds each recv, so a remote
    trickling a byte a second would hold the client for as long as it liked.
    The first recv of a reply keeps the socket's own timeout (no system call
    in the usual case); later ones get what is left of the deadline.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.shortened = False  # the socket's timeout was cut to fit a deadline
        self._buf = bytearray()

    def reply(self, limit: float) -> Tuple[int, bytes]:
        """The next whole reply, as smtplib's getreply() returns it: its code
        (-1 when a line does not start with three digits) and the text of its
        lines joined by "\n".

        One pass over the buffer for all the lines of a reply, and the clock
        read only when a recv is needed: this runs four times per message.

        Raises:
            smtplib.SMTPServerDisconnected: EOF before the reply was whole.
            smtplib.SMTPResponseException: a line over _MAX_REPLY_LINE octets.
            socket.timeout: no whole reply within `limit` seconds.
            OSError: the connection failed.
        """
        buf = self._buf
        lines = []
        deadline = None  # set at the first recv, which the socket's timeout bounds
        start = 0  # where the next line of this reply begins in buf
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                if len(buf) - start > _MAX_REPLY_LINE:
                    raise smtplib.SMTPResponseException(500, "Line too long.")
                if deadline is None:
                    deadline = time.monotonic() + limit
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise socket.timeout("no complete reply within %gs" % limit)
                    _recv_limit(self.sock, remaining)
                    self.shortened = True
                try:
                    chunk = self.sock.recv(65536)
                except (socket.timeout, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
                    raise socket.timeout("no complete reply within %gs" % limit) from None
                if not chunk:
                    raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
                buf += chunk
                continue
            line = buf[start:end + 1]
            start = end + 1
            if len(line) > _MAX_REPLY_LINE:
                raise smtplib.SMTPResponseException(500, "Line too long.")
            lines.append(bytes(line[4:].strip(b" \t\r\n")))
            if not line[:3].isdigit():
                code = -1
                break
            code = int(line[:3])
            if line[3:4] != b"-":
                break
        del buf[:start]
        return code, b"\n".join(lines)

    def close(self) -> None:
        self._buf.clear()


def _recv_limit(sock: socket.socket, seconds: float) -> None:
    if sock.gettimeout() is None:  # kernel timeouts, see use_kernel_timeouts
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
    else:
        sock.settimeout(seconds)


class _WholeReplies:
    """smtplib with getreply() bounded as a whole by the timeout (SPEC 5.3)."""

    def getreply(self):
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        reader = self.file
        if not isinstance(reader, _ReplyReader) or reader.sock is not self.sock:
            reader = self.file = _ReplyReader(self.sock)  # a new one after STARTTLS: no plaintext carried over
        try:
            return reader.reply(self.timeout)
        except OSError as exc:
            self.close()
            if isinstance(exc, smtplib.SMTPException):
                raise
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed: %s" % exc) from None
        finally:
            if reader.shortened and self.sock is not None:
                _recv_limit(self.sock, self.timeout)  # for the next reply's first recv
                reader.shortened = False


class Client(_WholeReplies, smtplib.SMTP):
    """smtp:// and starttls:// remotes."""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        if port in NO_GREETING_PROBE_PORTS:
            return sock
        try:
            _await_greeting(sock, timeout, host, port)
        except BaseException:
            sock.close()
            raise
        return sock


class ClientTLS(_WholeReplies, smtplib.SMTP_SSL):
    """tls:// and smtps:// remotes."""

    def _get_socket(self, host, port, timeout):
        try:
            return super()._get_socket(host, port, timeout)
        except ssl.SSLError as exc:
            if getattr(exc, "reason", None) in _PLAIN_TEXT_ANSWERS:
                raise SetupFailed("%s:%d answered in plain text, not TLS: it expects STARTTLS "
                                  "(use starttls:// or smtp://)" % (host, port)) from None
            raise


def _await_greeting(sock: socket.socket, timeout: float, host: str, port: int) -> None:
    """Wait for the greeting's first byte; when none comes, tell a remote that
    wants implicit TLS apart by offering it a handshake (see GREETING_PROBE).

    Raises:
        SetupFailed: no greeting: the remote wants TLS at once, answered the
            probe in plain text, or stayed mute for the whole timeout.
    """
    wait = min(GREETING_PROBE, timeout / 2)
    readable, _, _ = select.select([sock], [], [], wait)
    if readable:
        return
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with probe.wrap_socket(sock.dup(), do_handshake_on_connect=False) as tls:
            tls.settimeout(timeout - wait)
            tls.do_handshake()
    except socket.timeout:
        raise SetupFailed("%s:%d sent no greeting: timed out after %gs" % (host, port, timeout)) from None
    except (ssl.SSLError, OSError):
        raise SetupFailed("%s:%d sent no greeting within %gs" % (host, port, wait)) from None
    raise SetupFailed("%s:%d sent no greeting but answered a TLS handshake: it expects implicit "
                      "TLS (use tls:// or smtps://)" % (host, port))


def use_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound each send and recv by the kernel instead of a poll() before each
    (see wire.KERNEL_TIMEOUTS); an expired wait ends the connection."""
    timeval = _timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.settimeout(None)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    micro = max(int((seconds - whole) * 1e6), 0 if whole else 1)  # a zero timeval waits forever
    return struct.pack("@ll", whole, micro)
