"""A scripted raw-socket SMTP remote for the SPEC 5.3 tests of how the relay
behaves towards remotes (this module has no tests): refusals at any verb,
implicit TLS, a remote that never greets, one that trickles its replies."""

import socket
import threading
import time


class ScriptedSMTP:
    """Serves connections one after another from a thread; records each line.

    `replies` maps a verb to its reply line (bytes) instead of the default
    success; `tls` (a server SSLContext) makes it an implicit-TLS server;
    `greet=False` never greets; `greet_delay` greets that late and keeps in
    `pregreet` what the client sent before; `trickle` sends each reply one
    byte every `trickle` seconds; `port` is the port to listen on (0: any).
    """

    def __init__(self, replies=None, pipelining=False, tls=None, greet=True, trickle=0.0,
                 greet_delay=0.0, port=0):
        self.replies = dict(replies or {})
        self.pipelining = pipelining
        self.tls = tls
        self.greet = greet
        self.trickle = trickle
        self.greet_delay = greet_delay
        self.pregreet = b""
        self.lines = []
        self.closed = threading.Event()  # set when a connection has ended
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="test-scripted-smtp", daemon=True)
        self._thread.start()

    def url(self, scheme="smtp"):
        return "%s://127.0.0.1:%d" % (scheme, self.port)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            try:
                self._serve(conn)
            except (OSError, EOFError):
                pass
            finally:
                conn.close()
                self.closed.set()

    def _send(self, conn, data):
        if not self.trickle:
            conn.sendall(data)
            return
        for i in range(len(data)):
            if self._stop.wait(self.trickle):
                return
            conn.sendall(data[i:i + 1])

    def _serve(self, conn):
        conn.settimeout(5)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        if not self.greet:
            while conn.recv(4096):
                pass
            return
        if self.greet_delay:
            conn.settimeout(self.greet_delay)
            try:
                self.pregreet = conn.recv(4096)
            except socket.timeout:
                pass
            conn.settimeout(5)
        self._send(conn, b"220 scripted.test ESMTP\r\n")
        reader = conn.makefile("rb")
        data_mode = False
        while not self._stop.is_set():
            line = reader.readline()
            if not line:
                raise EOFError
            line = line.rstrip(b"\r\n")
            if data_mode:
                if line == b".":
                    data_mode = False
                    self._send(conn, self.replies.get("DOT", b"250 2.0.0 queued") + b"\r\n")
                continue
            self.lines.append(line.decode("utf-8", "replace"))
            verb = line[:4].upper().decode("ascii", "replace")
            if verb == "EHLO":
                ext = b"250-PIPELINING\r\n" if self.pipelining else b""
                self._send(conn, b"250-scripted.test\r\n" + ext + b"250 8BITMIME\r\n")
                continue
            reply = self.replies.get(verb, b"354 go" if verb == "DATA" else
                                     b"221 2.0.0 bye" if verb == "QUIT" else b"250 2.0.0 OK")
            self._send(conn, reply + b"\r\n")
            if verb == "QUIT":
                return
            data_mode = verb == "DATA" and reply.startswith(b"354")


def wait_closed(remote, timeout=5.0):
    """True once the remote saw a connection end."""
    return remote.closed.wait(timeout)


def elapsed(started):
    return time.monotonic() - started
