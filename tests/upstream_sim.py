"""A simulated rate-limited upstream (SPEC 13): an SMTP server on loopback
that behaves like Microsoft 365 or Gmail when pushed too hard.

It counts simultaneous connections and refuses past `max_connections`
(at the greeting with 421, or at MAIL with Microsoft's 432), enforces a
message `rate` with Gmail's 421, answers a spent `quota` with Microsoft's
554, and can `hold` each message before its final reply. Used by the tests
and the benchmark; it speaks enough ESMTP (PIPELINING included) for smtplib
and the relay.
"""

import socket
import threading
import time

THROTTLE_MAIL = b"432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
THROTTLE_GREETING = b"421 4.3.2 Too many connections, try again later"
RATE_REFUSAL = b"421 4.7.0 Try again later, closing connection"
QUOTA_REFUSAL = b"554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
MAX_LINE = 4096


class Upstream:
    def __init__(self, max_connections=None, refuse_at="mail", rate=None, quota=None, hold=0.0):
        self.max_connections, self.refuse_at = max_connections, refuse_at
        self.rate, self.quota, self.hold = rate, quota, hold
        self.lock = threading.Condition()
        self.open_now = self.max_seen = self.connections = 0
        self.refusals = []  # (stage, reply line)
        self.messages = []  # (mail_from, rcpts, data)
        self.accepted_times = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._threads = []
        self._stopping = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def url(self, params=""):
        return "smtp://127.0.0.1:%d%s" % (self.port, params)

    def wait_for(self, predicate, timeout=10.0):
        """Wait until predicate() holds (checked whenever a counter changes)."""
        end = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
            return True

    def stop(self):
        self._stopping = True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()  # wake accept()
        except OSError:
            pass
        self._accepter.join(5)
        self._sock.close()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._stopping:
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _refuse(self, stage, line):
        with self.lock:
            self.refusals.append((stage, line.decode()))
            self.lock.notify_all()

    def _serve(self, conn):
        with self.lock:
            self.connections += 1
            self.open_now += 1
            self.max_seen = max(self.max_seen, self.open_now)
            over = self.max_connections is not None and self.open_now > self.max_connections
            self.lock.notify_all()
        try:
            conn.settimeout(10)
            if over and self.refuse_at == "greeting":
                self._refuse("greeting", THROTTLE_GREETING)
                conn.sendall(THROTTLE_GREETING + b"\r\n")
                return
            conn.sendall(b"220 upstream.test ESMTP\r\n")
            self._session(conn, over)
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open_now -= 1
                self.lock.notify_all()

    def _session(self, conn, over):
        reader = _Lines(conn)
        mail_from, rcpts = None, []
        while True:
            line = reader.line()
            if line is None:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(b"250-upstream.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n")
            elif verb == b"MAIL":
                refusal = self._mail_refusal(over)
                if refusal is not None:
                    conn.sendall(refusal + b"\r\n")
                    if refusal.startswith(b"421"):
                        return
                    mail_from = None
                    continue
                mail_from, rcpts = line[10:].strip(b"<>").decode(), []
                conn.sendall(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                if mail_from is None:
                    conn.sendall(b"503 5.5.1 need MAIL\r\n")
                else:
                    rcpts.append(line[8:].strip(b"<>").decode())
                    conn.sendall(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                if mail_from is None or not rcpts:
                    conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                    continue
                conn.sendall(b"354 go ahead\r\n")
                data = reader.body()
                if data is None:
                    return
                if self.hold:
                    time.sleep(self.hold)
                with self.lock:
                    self.messages.append((mail_from, rcpts, data))
                    self.accepted_times.append(time.monotonic())
                    self.lock.notify_all()
                conn.sendall(b"250 2.0.0 OK queued\r\n")
                mail_from = None
            elif verb == b"RSET":
                mail_from = None
                conn.sendall(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 OK\r\n")

    def _mail_refusal(self, over):
        if over and self.refuse_at == "mail":
            self._refuse("MAIL", THROTTLE_MAIL)
            return THROTTLE_MAIL
        with self.lock:
            now = time.monotonic()
            if self.quota is not None and len(self.messages) >= self.quota:
                found = QUOTA_REFUSAL
            elif self.rate is not None:
                count, per = self.rate
                recent = [t for t in self.accepted_times if now - t < per]
                found = RATE_REFUSAL if len(recent) >= count else None
            else:
                found = None
        if found is not None:
            self._refuse("MAIL", found)
        return found


class _Lines:
    """Buffered reads: lines of a pipelined client, then a dot-terminated body."""

    def __init__(self, conn):
        self.conn, self.buf = conn, b""

    def _more(self):
        chunk = self.conn.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def line(self):
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_LINE or not self._more():
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def body(self):
        while b"\r\n.\r\n" not in self.buf:
            if not self._more():
                return None
        data, self.buf = self.buf.split(b"\r\n.\r\n", 1)
        return data.replace(b"\r\n..", b"\r\n.") + b"\r\n"
