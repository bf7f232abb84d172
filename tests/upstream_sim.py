"""A simulated rate-limited upstream (SPEC 13): an SMTP server on loopback that
refuses like Microsoft 365 and Gmail do, for the remote-limit tests and the
bench row of bench/limits_bench.py (this module has no tests of the relay;
tests/test_upstream_sim.py tests the simulator itself).

Raw sockets and plain threads, not aiosmtpd: every reply, every refusal and
every count must be exact. Standard library only, so the bench can import it
by path. Must not sleep to synchronise: `wait_for` waits on a Condition.
"""

import base64
import binascii
import bisect
import select
import socket
import ssl
import threading
import time
from typing import Callable, List, Optional, Tuple

MAX_LINE = 4096  # command line cap, as the relay's (SPEC 3.2; RFC 5321 4.5.3.1.4 asks for 512)
MAX_MESSAGE = 36700160  # bytes; the SIZE Microsoft 365 advertises (35 MB)
TIMEOUT = 10.0  # seconds a socket may stay silent before the simulator closes it
JOIN_TIMEOUT = 5.0  # seconds stop() gives each thread to end

# The refusals, as the providers word them (SPEC 13).
REFUSE_GREETING = "421 4.3.2 Too many concurrent connections, closing transmission channel"
REFUSE_THREADS = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
REFUSE_RATE = "421 4.7.0 Try again later, closing connection"
REFUSE_QUOTA = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"

OK = "250 2.0.0 OK"
QUEUED = "250 2.6.0 <%d@upstream.sim> Queued mail for delivery"
GO_AHEAD = "354 Start mail input; end with <CRLF>.<CRLF>"
BYE = "221 2.0.0 Service closing transmission channel"
TLS_READY = "220 2.0.0 SMTP server ready"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication unsuccessful"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
AUTH_NEEDED = "530 5.7.57 Client not authenticated to send mail"
AUTH_UNKNOWN = "504 5.7.4 Unrecognized authentication type"
USERNAME = "334 VXNlcm5hbWU6"  # "Username:"
PASSWORD = "334 UGFzc3dvcmQ6"  # "Password:"
CONTINUE = "334 "
NEED_HELO = "503 5.5.1 Send hello first"
NESTED_MAIL = "503 5.5.1 Sender already specified"
NEED_MAIL = "503 5.5.1 Need mail command"
NEED_RCPT = "503 5.5.1 Need rcpt command"
NO_TLS_NOW = "503 5.5.1 TLS already active or not offered"
BAD_SYNTAX = "501 5.5.4 Invalid arguments"
TOO_LONG = "500 5.5.2 Line too long"
UNKNOWN = "500 5.5.2 Command not recognized"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TIMED_OUT = "421 4.4.2 Connection timed out"


class _Closed(Exception):
    """The client went away, or the simulator closed the connection."""


class UpstreamSim:
    """An SMTP upstream with the limits of SPEC 13, on 127.0.0.1 and a free port.

    Options:
      max_connections: simultaneous connections allowed; a connection past it
        gets no slot and is refused at `refuse_at`: "greeting" (421 4.3.2 and
        close) or "mail" (greets; each MAIL without a slot gets 432 4.3.2, as
        Microsoft 365 does; it takes a slot if one was freed meanwhile).
      rate: (count, per_seconds): MAIL is let through while the messages
        accepted in the last per_seconds plus the transactions under way stay
        below count; past it, 421 4.7.0 (Gmail) and close.
      quota: messages (or recipients, with quota_counts="recipients") accepted
        in all; once spent, MAIL gets `quota_reply`, and so does the end of
        data of a message that would overspend it. The connection stays open.
      hold: seconds each message is held before the reply to its final dot.
      auth: None (no AUTH), True (any credentials) or (user, password). With
        auth, MAIL needs AUTH first.
      tls: a server SSLContext: STARTTLS is offered, and AUTH only after it.
      hostname: the name in the greeting and the EHLO reply.
      timeout: seconds a client may stay silent before it gets 421 4.4.2 and
        is closed, so a stuck client never hangs a test.
      clock: the time source for the rate window and accepted_times.

    Counters, updated under one lock (read them directly; `wait_for` waits
    for a change):
      connections: connections accepted in all.
      open_now: connections open now; max_seen: its peak (refused ones count).
      refusals: [(stage, reply)] of the limit refusals sent; stage is
        "greeting", "mail" or "data".
      messages: [(mail_from, rcpts, data)] accepted, data dot-unstuffed.
      accepted_times: clock() of each accepted message, in order.
      holding: messages in their hold now.
      logins: the user of each successful AUTH.
      errors: repr() of each unexpected exception in a session (a simulator
        bug; tests assert it stays empty).
    """

    def __init__(self, max_connections: Optional[int] = None, refuse_at: str = "mail",
                 rate: Optional[Tuple[int, float]] = None, quota: Optional[int] = None,
                 quota_counts: str = "messages", quota_reply: str = REFUSE_QUOTA, hold: float = 0.0,
                 auth=None, tls: Optional[ssl.SSLContext] = None, hostname: str = "upstream.sim",
                 timeout: float = TIMEOUT, clock: Callable[[], float] = time.monotonic):
        if refuse_at not in ("greeting", "mail"):
            raise ValueError("refuse_at must be 'greeting' or 'mail', not %r" % refuse_at)
        if quota_counts not in ("messages", "recipients"):
            raise ValueError("quota_counts must be 'messages' or 'recipients', not %r" % quota_counts)
        self.max_connections = max_connections
        self.refuse_at = refuse_at
        self.rate = rate
        self.quota = quota
        self.quota_counts = quota_counts
        self.quota_reply = quota_reply
        self.hold = hold
        self.auth = auth
        self.tls = tls
        self.hostname = hostname
        self.timeout = timeout
        self.clock = clock
        self.host = "127.0.0.1"
        self.port: Optional[int] = None
        self.connections = 0
        self.open_now = 0
        self.max_seen = 0
        self.refusals: List[Tuple[str, str]] = []
        self.messages: List[Tuple[str, List[str], bytes]] = []
        self.accepted_times: List[float] = []
        self.holding = 0
        self.logins: List[str] = []
        self.errors: List[str] = []
        self._cond = threading.Condition()
        self._slots = 0  # connections holding a slot under max_connections
        self._under_way = 0  # transactions past MAIL, counted against the rate
        self._recipients = 0  # recipients accepted, for quota_counts="recipients"
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._accepter: Optional[threading.Thread] = None
        self._threads: List[threading.Thread] = []
        self._socks: set = set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "UpstreamSim":
        """Listen on a free loopback port (then in `port`) and serve from threads."""
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accepter = threading.Thread(target=self._accept, name="upstream-sim-accept", daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join every thread.

        Raises:
            RuntimeError: a thread did not end within JOIN_TIMEOUT.
        """
        self._stop.set()
        if self._wake_w is not None:
            self._wake_w.send(b"x")
        if self._accepter is not None:
            self._accepter.join(JOIN_TIMEOUT)
        with self._cond:
            socks = list(self._socks)
        for sock in socks:
            try:
                # socket.socket's own shutdown: an SSLSocket's would touch its TLS state
                # from this thread while the session thread may be inside recv.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its session
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        alive = [t.name for t in [self._accepter] + self._threads if t is not None and t.is_alive()]
        if alive:
            raise RuntimeError("upstream simulator threads did not end: %s" % ", ".join(alive))

    def __enter__(self) -> "UpstreamSim":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, query: str = "", scheme: str = "smtp", userinfo: str = "") -> str:
        """The remote URL for the relay: `smtp://127.0.0.1:<port>` plus `?query`."""
        at = userinfo + "@" if userinfo else ""
        return "%s://%s%s:%d%s" % (scheme, at, self.host, self.port, "?" + query if query else "")

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until predicate() (called under the counters' lock) is true; False on timeout."""
        with self._cond:
            return bool(self._cond.wait_for(predicate, timeout))

    # -- accepting ---------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue  # the client gave up between select and accept
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True,
                                      name="upstream-sim-session-%d" % (self.connections + 1))
            with self._cond:
                self.connections += 1
                self.open_now += 1
                self.max_seen = max(self.max_seen, self.open_now)
                self._socks.add(conn)
                self._cond.notify_all()
            self._threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        session = _Session(self, conn)
        try:
            session.run()
        except (_Closed, OSError):
            pass  # the client went away or timed out; nothing to answer
        except Exception as exc:  # a bug in the simulator: make the test see it
            with self._cond:
                self.errors.append(repr(exc))
        finally:
            with self._cond:
                self._socks.discard(conn)
                self._socks.discard(session.sock)
                if session.slot:
                    self._slots -= 1
                if session.under_way:
                    self._under_way -= 1
                self.open_now -= 1
                self._cond.notify_all()
            session.sock.close()

    # -- the limits (called by sessions) -----------------------------------

    def _take_slot(self) -> bool:
        with self._cond:
            if self.max_connections is not None and self._slots >= self.max_connections:
                return False
            self._slots += 1
            return True

    def _refused(self, stage: str, reply: str) -> None:
        with self._cond:
            self.refusals.append((stage, reply))
            self._cond.notify_all()

    def _spent(self, more: int) -> bool:
        """True when accepting `more` (messages or recipients) would pass the quota."""
        if self.quota is None:
            return False
        done = len(self.messages) if self.quota_counts == "messages" else self._recipients
        return done + more > self.quota

    def _admit_mail(self) -> Optional[str]:
        """None when a new transaction may start (and is counted), else the refusal."""
        with self._cond:
            if self._spent(1):
                return self.quota_reply
            if self.rate is not None:
                count, per = self.rate
                since = bisect.bisect_right(self.accepted_times, self.clock() - per)
                if len(self.accepted_times) - since + self._under_way >= count:
                    return REFUSE_RATE
            self._under_way += 1
            self._cond.notify_all()
            return None

    def _accept_message(self, mail_from: str, rcpts: List[str], data: bytes) -> str:
        """Record the message and return its 250, or return the quota refusal."""
        with self._cond:
            self._under_way -= 1
            self._cond.notify_all()
            if self._spent(1 if self.quota_counts == "messages" else len(rcpts)):
                return self.quota_reply
            self.messages.append((mail_from, list(rcpts), data))
            self.accepted_times.append(self.clock())
            self._recipients += len(rcpts)
            return QUEUED % len(self.messages)

    def _held(self) -> bool:
        """Hold one message for `hold` seconds; True when stop() cut the hold short."""
        with self._cond:
            self.holding += 1
            self._cond.notify_all()
        try:
            return self._stop.wait(self.hold)
        finally:
            with self._cond:
                self.holding -= 1
                self._cond.notify_all()

    def _end_transaction(self) -> None:
        with self._cond:
            self._under_way -= 1
            self._cond.notify_all()


class _Session:
    """One connection: reads lines from its own buffer and answers each in order,
    so a pipelined batch (MAIL, RCPT..., DATA in one write) gets its replies in turn."""

    def __init__(self, sim: UpstreamSim, sock: socket.socket):
        self.sim = sim
        self.sock = sock
        # Each reply goes out at once, as a server that answers a pipelined
        # batch in one write would: without this, Nagle holds the second
        # small reply for the client's delayed ACK (up to 40 ms a message).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.slot = False  # holds one of max_connections
        self.under_way = False  # a transaction counted by the rate limit
        self.helo = False
        self.tls = False
        self.user: Optional[str] = None
        self.mail_from: Optional[str] = None
        self.rcpts: List[str] = []

    # -- the wire ----------------------------------------------------------

    def send(self, reply: str) -> None:
        self.sock.sendall(reply.encode("ascii") + b"\r\n")

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            self.send(TIMED_OUT)
            raise _Closed() from None
        if not chunk:
            raise _Closed()
        self.buf += chunk

    def line(self) -> Optional[bytes]:
        """The next line without its CRLF, or None after answering one too long."""
        scanned = 0
        while True:
            end = self.buf.find(b"\r\n", scanned)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                if len(line) > MAX_LINE:
                    self.send(TOO_LONG)
                    return None
                return line
            if len(self.buf) > MAX_LINE:
                # Drain to the end of the line without keeping it (STYLE 2.8).
                del self.buf[:len(self.buf) - 1]
                while True:
                    self._fill()
                    end = self.buf.find(b"\r\n")
                    if end >= 0:
                        del self.buf[:end + 2]
                        self.send(TOO_LONG)
                        return None
                    del self.buf[:len(self.buf) - 1]
            scanned = max(0, len(self.buf) - 1)
            self._fill()

    def read_data(self) -> Optional[bytes]:
        """The message up to the lone dot, dot-unstuffed; None when past MAX_MESSAGE."""
        data = bytearray(b"\r\n")  # so a first line "." is found as "\r\n.\r\n"
        data += self.buf
        self.buf = bytearray()
        scanned = 0
        kept = 0  # bytes dropped past MAX_MESSAGE
        while True:
            end = data.find(b"\r\n.\r\n", scanned)
            if end >= 0:
                self.buf = data[end + 5:]
                if kept:
                    return None
                body = bytes(data[:end + 2]).replace(b"\r\n.", b"\r\n")  # [R5321 4.5.2]
                return body[2:]
            if len(data) > MAX_MESSAGE + 2:
                kept += len(data) - 4
                del data[:len(data) - 4]
            scanned = max(0, len(data) - 4)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                self.send(TIMED_OUT)
                raise _Closed() from None
            if not chunk:
                raise _Closed()
            data += chunk

    # -- the session -------------------------------------------------------

    def run(self) -> None:
        self.sock.settimeout(self.sim.timeout)
        self.slot = self.sim._take_slot()
        if not self.slot and self.sim.refuse_at == "greeting":
            self.sim._refused("greeting", REFUSE_GREETING)
            self.send(REFUSE_GREETING)
            return
        self.send("220 %s Microsoft ESMTP MAIL Service ready (simulated)" % self.sim.hostname)
        verbs = {
            b"EHLO": self.smtp_EHLO, b"HELO": self.smtp_HELO, b"STARTTLS": self.smtp_STARTTLS,
            b"AUTH": self.smtp_AUTH, b"MAIL": self.smtp_MAIL, b"RCPT": self.smtp_RCPT,
            b"DATA": self.smtp_DATA, b"RSET": self.smtp_RSET, b"NOOP": self.smtp_NOOP,
        }
        while not self.sim._stop.is_set():
            line = self.line()
            if line is None:
                continue
            verb, _, arg = line.partition(b" ")
            verb = verb.upper()
            if verb == b"QUIT":
                self.send(BYE)
                return
            handler = verbs.get(verb)
            if handler is None:
                self.send(UNKNOWN)
                continue
            if handler(arg.decode("utf-8", "surrogateescape").strip()) is False:
                return  # the handler closed the session

    def _reset(self) -> None:
        if self.under_way:
            self.under_way = False
            self.sim._end_transaction()
        self.mail_from = None
        self.rcpts = []

    def _auth_offered(self) -> bool:
        return self.sim.auth is not None and (self.sim.tls is None or self.tls)

    def smtp_EHLO(self, arg: str):
        if not arg:
            return self.send(BAD_SYNTAX)
        self._reset()
        self.helo = True
        lines = ["%s Hello [127.0.0.1]" % self.sim.hostname, "SIZE %d" % MAX_MESSAGE, "PIPELINING",
                 "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.sim.tls is not None and not self.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        self.send("\r\n".join("250-" + text for text in lines[:-1]) + "\r\n250 " + lines[-1])

    def smtp_HELO(self, arg: str):
        if not arg:
            return self.send(BAD_SYNTAX)
        self._reset()
        self.helo = True
        self.send("250 %s Hello [127.0.0.1]" % self.sim.hostname)

    def smtp_STARTTLS(self, arg: str):
        if self.sim.tls is None or self.tls:
            return self.send(NO_TLS_NOW)
        self.send(TLS_READY)
        self.buf = bytearray()  # bytes sent before the handshake are never commands (CVE-2011-0411)
        raw = self.sock
        self.sock = self.sim.tls.wrap_socket(raw, server_side=True)
        with self.sim._cond:
            self.sim._socks.discard(raw)
            self.sim._socks.add(self.sock)
        self.tls = True
        self.helo = False
        self._reset()

    def smtp_AUTH(self, arg: str):
        if not self._auth_offered():
            return self.send(UNKNOWN)
        if not self.helo or self.mail_from is not None or self.user is not None:
            return self.send(NEED_HELO if not self.helo else "503 5.5.1 Bad sequence of commands")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            answer = initial or self._challenge(CONTINUE)
            if answer is None:
                return
            decoded = self._b64(answer)
            parts = decoded.split("\0") if decoded is not None else []
            if len(parts) != 3:
                return self.send(BAD_SYNTAX)
            user, password = parts[1], parts[2]
        elif mechanism == "LOGIN":
            user = self._b64(initial) if initial else self._b64_challenge(USERNAME)
            if user is None:
                return
            password = self._b64_challenge(PASSWORD)
            if password is None:
                return
        else:
            return self.send(AUTH_UNKNOWN)
        if self.sim.auth is not True and (user, password) != tuple(self.sim.auth):
            return self.send(AUTH_FAILED)
        self.user = user
        with self.sim._cond:
            self.sim.logins.append(user)
            self.sim._cond.notify_all()
        self.send(AUTH_OK)

    def _challenge(self, prompt: str) -> Optional[str]:
        """Send a 334 prompt; the client's answer, or None once answered "*"."""
        self.send(prompt)
        line = self.line()
        if line is None:
            return None
        if line == b"*":
            self.send(AUTH_CANCELLED)
            return None
        return line.decode("ascii", "replace")

    def _b64_challenge(self, prompt: str) -> Optional[str]:
        answer = self._challenge(prompt)
        if answer is None:
            return None
        decoded = self._b64(answer)
        if decoded is None:
            self.send(BAD_SYNTAX)
        return decoded

    @staticmethod
    def _b64(text: str) -> Optional[str]:
        try:
            return base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None

    @staticmethod
    def _path(arg: str, keyword: str) -> Optional[str]:
        """The address of `FROM:<a> params` (keyword "FROM"), or None when malformed."""
        if arg[:len(keyword) + 1].upper() != keyword + ":":
            return None
        rest = arg[len(keyword) + 1:].strip()
        if not rest.startswith("<") or ">" not in rest:
            return None
        return rest[1:rest.index(">")]

    def smtp_MAIL(self, arg: str):
        if not self.helo:
            return self.send(NEED_HELO)
        if self.mail_from is not None:
            return self.send(NESTED_MAIL)
        if self.sim.auth is not None and self.user is None:
            return self.send(AUTH_NEEDED)
        address = self._path(arg, "FROM")
        if address is None:
            return self.send(BAD_SYNTAX)
        if not self.slot:
            self.slot = self.sim._take_slot()
            if not self.slot:
                self.sim._refused("mail", REFUSE_THREADS)
                return self.send(REFUSE_THREADS)
        refusal = self.sim._admit_mail()
        if refusal is not None:
            self.sim._refused("mail", refusal)
            self.send(refusal)
            if refusal == REFUSE_RATE:
                return False  # Gmail closes the connection after this one
            return None
        self.under_way = True
        self.mail_from = address
        self.send(OK)

    def smtp_RCPT(self, arg: str):
        if self.mail_from is None:
            return self.send(NEED_MAIL)
        address = self._path(arg, "TO")
        if not address:
            return self.send(BAD_SYNTAX)
        self.rcpts.append(address)
        self.send(OK)

    def smtp_DATA(self, arg: str):
        if self.mail_from is None:
            return self.send(NEED_MAIL)
        if not self.rcpts:
            return self.send(NEED_RCPT)
        self.send(GO_AHEAD)
        data = self.read_data()
        if data is None:
            self._reset()
            return self.send(TOO_BIG)
        if self.sim.hold and self.sim._held():
            raise _Closed()  # stopped while holding: the message is not accepted
        self.under_way = False  # _accept_message ends the count
        reply = self.sim._accept_message(self.mail_from, self.rcpts, data)
        self._reset()
        if reply == self.sim.quota_reply:
            self.sim._refused("data", reply)
        self.send(reply)

    def smtp_RSET(self, arg: str):
        self._reset()
        self.send(OK)

    def smtp_NOOP(self, arg: str):
        self.send(OK)
