"""The dispatcher: talking SMTP to a remote (SPEC 5.3, 10, 11, 13).

Owns the `Dispatcher` (a pool of greeted, secured and authenticated
connections per remote, each a `smtp_client` connection, within the
remote's limits from `accounts`), AUTH PLAIN/LOGIN/XOAUTH2, the retry after
a throttle reply and the `-test-remotes` probe. Must not choose remotes or
map failures to client replies: it takes one remote, an envelope and bytes,
and returns what the remote did (`Sent`) or a `Failure`.
"""

import re
import select
import smtplib
import ssl
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from relay_lib import failure, metrics, replies
from relay_lib.config.remotes import Remote
from relay_lib.failure import Failure, reply_text
from relay_lib.files import check_folder
from relay_lib.limits import Hold
from relay_lib.netaddr import is_loopback
from relay_lib.outbound.accounts import THROTTLE_PAUSE, Accounts
from relay_lib.outbound.smtp_client import KERNEL_TIMEOUTS, Client, ClientTLS, SetupFailed, use_kernel_timeouts

# Strategy: `Dispatcher.send` runs one SMTP transaction on an smtplib
# connection taken from a small per-remote pool of connections that already
# did EHLO, STARTTLS and AUTH. A reused connection idle for more than
# TRUST_RECENT seconds first passes a zero-wait readability check (a closed or
# timed-out connection is readable: EOF or an unsolicited 421). When the remote
# advertises PIPELINING [R2920], MAIL/RCPT/DATA go out in one write and
# the replies are read in order; otherwise one command at a time. Both paths
# judge the replies with the same code and stop at the first failure, and
# every failure closes the connection instead of returning it to the pool.
# A reused connection that turns out dead, or answers 421, before the body
# was sent is retried once on a fresh connection: nothing was delivered yet.
# Inside, smtplib raises; at the boundary, `send` returns a Failure instead.

_DOT_LINE = re.compile(rb"(?m)^\.")
TRUST_RECENT = 2.0  # seconds since its last use in which a pooled connection skips the liveness check
_QUIT_TIMEOUT = 2.0  # seconds to hand a QUIT to the kernel when closing
# The steps of setting up a connection, as -test-remotes names them, and the
# stage a failure there is reported at.
_SETUP_STAGES = {"token": failure.TOKEN, "connect": failure.CONNECT, "TLS connect": failure.CONNECT,
                 "EHLO": failure.EHLO, "STARTTLS": failure.STARTTLS, "AUTH": failure.AUTH}


class Sent(NamedTuple):
    """What the remote said of each recipient: its final reply for those it
    took (None when it took none), and the ones it refused one by one
    (only with keep_going)."""

    reply: Optional[str]
    refused: Dict[str, Failure]


class _TokenRefused(SetupFailed):
    """AUTH XOAUTH2 got 535 with a cached token: it may have been revoked (SPEC 10)."""

    def __init__(self, token, text: str, code: int, raw: Union[bytes, str]):
        super().__init__(text, code, raw)
        self.token = token


class _Refused(Exception):
    """The remote refused MAIL, RCPT or DATA: unwinds the transaction with its Failure."""

    def __init__(self, failure: Failure):
        super().__init__(failure.describe())
        self.failure = failure


class _Stale(Exception):
    """A pooled connection turned out dead before the remote saw the message."""


class _Conn:
    """One open, greeted, authenticated smtplib connection.

    `in_step` is False while the remote may still owe replies or wait for
    a body; only a connection in step is closed with QUIT. `stage` is the
    step of the transaction under way, for the Failure if it breaks.
    """

    __slots__ = ("smtp", "pipelining", "last_used", "in_step", "stage", "_closed")

    def __init__(self, smtp: smtplib.SMTP, closed=None):
        self.smtp = smtp
        self.pipelining = smtp.has_extn("pipelining")
        self.last_used = time.monotonic()
        self.in_step = True
        self.stage = failure.MAIL
        self._closed = closed  # told once when the connection closes (the account's open count)

    def looks_alive(self) -> bool:
        """True unless the socket is readable, which means EOF or an unsolicited reply."""
        sock = self.smtp.sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def on_close(self, closed) -> None:
        """Call `closed()` once, when this connection closes."""
        self._closed = closed

    def close(self, polite: bool = False) -> None:
        _close(self.smtp, polite)
        closed, self._closed = self._closed, None
        if closed is not None:
            closed()


def _close(smtp: smtplib.SMTP, polite: bool) -> None:
    """Close; `polite` sends QUIT first without waiting for its reply.

    Waiting for 221 would cost a round trip while a client waits for its
    own reply, and the answer changes nothing [R5321 4.1.1.10].
    """
    try:
        if polite and smtp.sock is not None:
            smtp.sock.settimeout(_QUIT_TIMEOUT)
            smtp.sock.sendall(b"QUIT\r\n")
    except OSError:
        pass  # the remote went away first; closing below is all that is left
    finally:
        smtp.close()


class Dispatcher:
    """Sends messages to SMTP remotes over pooled smtplib connections.

    Thread-safe: each connection is used by one thread at a time. At most
    `pool_size` idle connections are kept per remote (0 disables reuse); a
    connection idle longer than `pool_idle` seconds is closed. A remote that
    could not be connected to, greeted, TLS-upgraded or authenticated is
    down (`is_down`) for `failover_skip` seconds, or until it works again.
    """

    def __init__(self, hostname: str, timeout: float, client_cert: Optional[str],
                 client_key: Optional[str], pool_size: int, pool_idle: float,
                 failover_skip: float, tokens, accounts: Accounts):
        self.hostname = hostname
        self.accounts = accounts
        # The OAuth token source of auth=xoauth2 remotes (oauth.TokenSource):
        # get() returns (token, fetched by this call) or raises OSError; drop(token).
        self.tokens = tokens
        self.timeout = timeout
        self.pool_size = pool_size
        self.pool_idle = pool_idle
        self.failover_skip = failover_skip
        # Remote -> monotonic time until which it is skipped. Each read and
        # write is one atomic dict operation: no lock needed.
        self._down: Dict[Remote, float] = {}
        # One context per verification mode, built on first use and kept:
        # creating one loads the system trust store, far too slow per message.
        self._client_cert = client_cert, client_key
        self._contexts: Dict[bool, ssl.SSLContext] = {}
        self._idle: Dict[Remote, List[_Conn]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._reaper: Optional[threading.Thread] = None

    def send(self, remote: Remote, sender: str, rcpts: List[str], message: bytes,
             keep_going: bool = False, deadline: Optional[float] = None,
             hold: Optional[Hold] = None, patient: bool = True) -> Union[Sent, Failure]:
        """Send one message to `rcpts` through `remote`: what it took, or why not.

        The message first waits for room within the remote's limits until
        `deadline` (default: remote_wait from now), unless `hold` is room
        already reserved for it (`reserve_any`). After a throttle reply it
        waits a pause, doubling each time, and tries again within the same
        deadline (SPEC 13); unless not `patient` (a failover member with
        another one after it): then the throttle is the result.

        With `keep_going`, a recipient the remote refuses is recorded in
        `Sent.refused` and the others still get the message; when it refuses
        every one, `Sent.reply` is None and no body is sent.

        `message` has CRLF line ends and is sent byte for byte (dot-stuffed on
        the wire [R5321 4.5.2]). `remote.sender`, when set, replaces `sender`.
        The outcome and the time it took go to the remote metrics (SPEC 12).
        """
        if deadline is None:
            deadline = self.accounts.deadline()
        pause = THROTTLE_PAUSE
        while True:
            if hold is None:
                room = self.accounts.reserve(remote, len(rcpts), deadline)
                if isinstance(room, Failure):
                    return room
                hold = room
            try:
                result = self._counted(remote, sender, rcpts, message, keep_going)
            finally:
                hold.release()
                hold = None
            if not isinstance(result, Failure):
                self.accounts.delivered(remote)
                return result
            if result.kind is failure.Kind.QUOTA:
                return self.accounts.quota_spent(remote, result)
            if result.kind is not failure.Kind.THROTTLE:
                return result
            self.accounts.throttled(remote, result)
            if not patient:
                return result
            if time.monotonic() + pause >= deadline or self._stop.wait(pause):
                return self.accounts.no_room(remote, "throttled: %s" % result.describe())
            pause *= 2

    def reserve_any(self, remotes: List[Remote], rcpts: List[int],
                    deadline: float) -> Union[Tuple[int, Hold], Failure]:
        """Room at the first of a failover group's members that has it, else
        at whichever gets room first (SPEC 13), or the first member's "no room"."""
        picked = self.accounts.reserve_any(remotes, rcpts, deadline)
        if picked is None:
            return self.accounts.no_room(remotes[0], "every failover member is at its limits")
        return picked

    def deadline(self) -> float:
        """When a message that starts waiting for room now gives up (remote_wait)."""
        return self.accounts.deadline()

    def _counted(self, remote: Remote, sender: str, rcpts: List[str], message: bytes,
                 keep_going: bool) -> Union[Sent, Failure]:
        """One try, its outcome and time in the remote metrics (SPEC 12)."""
        started = time.monotonic()
        result = self._send(remote, sender, rcpts, message, {} if keep_going else None)
        worst = result if isinstance(result, Failure) else None
        if isinstance(result, Sent) and result.reply is None:
            worst = next(iter(result.refused.values()))
        _count(remote, "delivered" if worst is None else "rejected" if worst.permanent else "tempfailed",
               started)
        return result

    def _send(self, remote: Remote, sender: str, rcpts: List[str], message: bytes,
              refused: Optional[Dict[str, Failure]]) -> Union[Sent, Failure]:
        """send() without the counting: a pooled connection when one is idle, else a new one."""
        if remote.sender is not None:
            sender = remote.sender
        conn = self._checkout(remote)
        if conn is not None:
            try:
                return self._run(remote, conn, sender, rcpts, message, True, refused)
            except _Stale:
                conn.close()  # closed by the remote while idle: nothing was sent, retry
                if refused:
                    refused.clear()
        steps: List[str] = []
        self._make_room(remote)
        try:
            conn = self._open(remote, steps)
        except OSError as exc:  # SetupFailed and every smtplib error are OSErrors
            found = _setup_failure(remote, _SETUP_STAGES.get(steps[-1], failure.CONNECT), exc)
            if found.kind is not failure.Kind.THROTTLE:
                self._down[remote] = time.monotonic() + self.failover_skip
            return found
        self.accounts.opened(remote)
        conn.on_close(lambda: self.accounts.closed(remote))
        if self._down:
            self._down.pop(remote, None)
        return self._run(remote, conn, sender, rcpts, message, False, refused)

    def _make_room(self, remote: Remote) -> None:
        """Before a new connection: close idle ones of the same account that
        would take it past its limit (another remote of the account, or a
        limit lowered by a throttle reply) (SPEC 13)."""
        account = self.accounts.of(remote)
        while account.open >= account.connections.limit:
            with self._lock:
                victim = None
                for other, stack in self._idle.items():
                    if stack and self.accounts.of(other) is account:
                        victim = stack.pop(0)
                        break
            if victim is None:
                return
            victim.close(polite=True)

    def _run(self, remote: Remote, conn: _Conn, sender: str, rcpts: List[str], message: bytes,
             reused: bool, refused: Optional[Dict[str, Failure]]) -> Union[Sent, Failure]:
        """One transaction on `conn`, which goes back to the pool only after a 2xx.

        Raises:
            _Stale: a reused connection was found dead before the remote saw anything.
        """
        try:
            reply = _transaction(remote, conn, sender, rcpts, message, reused, refused)
        except _Stale:
            raise
        except _Refused as exc:
            conn.close(polite=conn.in_step)
            if refused and len(refused) == len(rcpts):
                return Sent(None, dict(refused))  # each recipient has its own answer
            return exc.failure
        except OSError as exc:  # dropped, timed out, or a reply too long to read
            conn.close(polite=conn.in_step)
            return failure.temporary(conn.stage, remote.masked(), _error(exc))
        except BaseException:
            conn.close(polite=conn.in_step)
            raise
        self._checkin(remote, conn)
        return Sent(reply, dict(refused or {}))

    def stop_waiting(self) -> None:
        """Shutdown: every message waiting for room ends as if its wait ran out (SPEC 13)."""
        self.accounts.close()
        self._stop.set()  # and a pause after a throttle reply ends too

    def close(self) -> None:
        """End every wait for room, close every idle connection (with QUIT)
        and stop the idle reaper."""
        self.accounts.close()
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        self._stop.set()
        for stack in idle.values():
            for conn in stack:
                conn.close(polite=True)
        reaper = self._reaper
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join(_QUIT_TIMEOUT)

    def is_down(self, remote: Remote) -> bool:
        """True while a remote that failed to connect or set up is skipped (SPEC 11)."""
        return self._down.get(remote, 0.0) > time.monotonic()

    def idle_count(self, remote: Remote) -> int:
        """How many idle connections the pool holds for remote (the pool tests watch it)."""
        with self._lock:
            return len(self._idle.get(remote, ()))

    def probe(self, remote: Remote) -> Tuple[bool, str]:
        """Check a remote as -test-remotes does (SPEC 10): connect, EHLO, TLS,
        AUTH and QUIT, sending no mail; a file: remote must be a writable folder.

        Returns (ok, detail): on failure, the step and what the server answered.
        """
        if remote.scheme == "file":
            try:
                check_folder(remote.path)
            except OSError as exc:
                return False, "folder: %s" % (exc.strerror or exc)
            return True, "writable folder"
        steps: List[str] = []
        self._make_room(remote)
        try:
            conn = self._open(remote, steps)
        except OSError as exc:  # SetupFailed and every smtplib error are OSErrors
            return False, "%s: %s" % (steps[-1], _why(exc))
        try:
            code, text = conn.smtp.docmd("QUIT")
        except OSError as exc:
            return False, "QUIT: %s" % _why(exc)
        finally:
            conn.smtp.close()
        if code != 221:
            return False, "QUIT: %d %s" % (code, reply_text(text))
        return True, "ok"

    def _open(self, remote: Remote, steps: Optional[List[str]] = None) -> _Conn:
        steps = [] if steps is None else steps
        try:
            return self._connect(remote, steps, retry=True)
        except _TokenRefused as exc:
            # SPEC 10: a cached token refused with 535 may have been revoked:
            # forget it, then once more with a new token on a new connection.
            self.tokens.drop(exc.token)
            return self._connect(remote, steps, retry=False)

    def _context(self, skip_verify: bool) -> ssl.SSLContext:
        context = self._contexts.get(skip_verify)
        if context is None:
            context = self._contexts[skip_verify] = _client_context(skip_verify, *self._client_cert)
        return context

    def _token(self):
        if self.tokens is None:
            raise SetupFailed("auth=xoauth2 needs oauth_token_url and oauth_client_id")
        try:
            return self.tokens.get()
        except OSError as exc:
            raise SetupFailed(str(exc)) from None  # temporary, like any setup failure (SPEC 10)

    def _connect(self, remote: Remote, steps: List[str], retry: bool) -> _Conn:
        """Connect, greet, secure and authenticate; `steps` records how far it got."""
        token, fetched = None, False
        if remote.auth == "xoauth2":
            steps.append("token")
            token, fetched = self._token()
        steps.append("TLS connect" if remote.implicit_tls else "connect")
        smtp: smtplib.SMTP
        try:
            if remote.implicit_tls:
                smtp = ClientTLS(remote.host, remote.port, local_hostname=self.hostname,
                                  timeout=self.timeout, context=self._context(remote.skip_verify))
            else:
                smtp = Client(remote.host, remote.port, local_hostname=self.hostname,
                               timeout=self.timeout)
        except smtplib.SMTPConnectError as exc:
            # A refused greeting (554 no service, a blocklisted relay IP) is a
            # refused connection: 451, never a bounce of every message (SPEC 4.1).
            raise SetupFailed("greeting refused: %d %s" % (exc.smtp_code, reply_text(exc.smtp_error)),
                              exc.smtp_code, exc.smtp_error) from None
        try:
            steps.append("EHLO")
            _hello(smtp)
            if not remote.implicit_tls:
                if smtp.has_extn("starttls"):
                    steps.append("STARTTLS")
                    try:
                        smtp.starttls(context=self._context(remote.skip_verify))
                    except smtplib.SMTPResponseException as exc:
                        raise SetupFailed("STARTTLS refused: %d %s" % (exc.smtp_code, reply_text(exc.smtp_error)),
                                          exc.smtp_code, exc.smtp_error) from None
                    _hello(smtp)  # [R3207 4.2]: forget what was said before TLS
                elif remote.scheme == "starttls":
                    raise SetupFailed("STARTTLS required but not offered")
            if remote.username is not None:
                steps.append("AUTH")
                if not isinstance(smtp.sock, ssl.SSLSocket) and not is_loopback(remote.host):
                    # As Go's net/smtp: never send a password in the clear over a network.
                    raise SetupFailed("refusing to AUTH without TLS (remote offered no STARTTLS)")
                smtp.user, smtp.password = remote.username, remote.password or ""
                try:
                    if token is not None:
                        _auth_xoauth2(smtp, remote.username, token)
                    elif remote.auth == "login":
                        smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
                    else:
                        smtp.auth("PLAIN", smtp.auth_plain)
                except smtplib.SMTPResponseException as exc:
                    text = "AUTH %s refused: %d %s" % (remote.auth.upper(), exc.smtp_code,
                                                       reply_text(exc.smtp_error))
                    if exc.smtp_code == 535 and token is not None and retry and not fetched:
                        raise _TokenRefused(token, text, exc.smtp_code, exc.smtp_error) from None
                    raise SetupFailed(text, exc.smtp_code, exc.smtp_error) from None
                finally:
                    smtp.password = ""  # not needed again on this connection
        except BaseException as exc:
            # A refusal before MAIL leaves the remote waiting for a command: say goodbye.
            _close(smtp, polite=isinstance(exc, SetupFailed))
            raise
        if KERNEL_TIMEOUTS and not isinstance(smtp.sock, ssl.SSLSocket):
            use_kernel_timeouts(smtp.sock, self.timeout)
        return _Conn(smtp)

    def _checkout(self, remote: Remote) -> Optional[_Conn]:
        if self.pool_size <= 0:
            return None
        while True:
            with self._lock:
                stack = self._idle.get(remote)
                conn = stack.pop() if stack else None
            if conn is None:
                return None
            idle = time.monotonic() - conn.last_used
            # A connection used a moment ago is taken on trust (saves a
            # system call per message); if it died after all, send() retries.
            if idle <= TRUST_RECENT or (idle <= self.pool_idle and conn.looks_alive()):
                return conn
            conn.close()

    def _checkin(self, remote: Remote, conn: _Conn) -> None:
        conn.last_used = time.monotonic()
        account = self.accounts.of(remote)
        with self._lock:
            keep = not self._closed and self.pool_size > 0
            stack = self._idle.setdefault(remote, []) if keep else []
            idle = sum(len(s) for r, s in self._idle.items() if self.accounts.of(r) is account)
            keep = keep and len(stack) < self.pool_size and self.accounts.keeps(remote, idle)
            if keep:
                stack.append(conn)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="smtprelay-pool-reaper",
                                                    daemon=True)
                    self._reaper.start()
        if not keep:
            conn.close(polite=True)

    def _reap(self) -> None:
        """Close connections idle longer than pool_idle, or closed by the remote meanwhile."""
        period = max(self.pool_idle / 2, 0.05)
        while not self._stop.wait(period):
            limit = time.monotonic() - self.pool_idle
            expired: List[_Conn] = []
            with self._lock:
                for stack in self._idle.values():
                    keep = [c for c in stack if c.last_used >= limit and c.looks_alive()]
                    expired.extend(c for c in stack if c not in keep)
                    stack[:] = keep
            for conn in expired:
                conn.close(polite=True)


def _count(remote: Remote, outcome: str, started: float) -> None:
    seconds = time.monotonic() - started
    endpoint = remote.endpoint
    metrics.REMOTE_DELIVERIES.labels(endpoint, outcome).inc()
    metrics.REMOTE_SECONDS.labels(endpoint).observe(seconds)


def _why(exc: OSError) -> str:
    """What went wrong, for one -test-remotes line: the OS error text or the reply."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _setup_failure(remote: Remote, stage: str, exc: OSError) -> Failure:
    """What a failed connect, greeting, EHLO, STARTTLS, AUTH or token fetch means."""
    code = getattr(exc, "code", 0) or getattr(exc, "smtp_code", 0)
    raw = getattr(exc, "raw", b"") or getattr(exc, "smtp_error", b"")
    if code:
        return failure.refused(stage, code, raw, remote.masked(), remote.host, detail=_error(exc))
    return failure.temporary(stage, remote.masked(), _error(exc))


def _error(exc: BaseException) -> str:
    """An exception as one log field: its type and its text."""
    return "%s: %s" % (type(exc).__name__, str(exc) or "no detail")


def _auth_xoauth2(smtp: smtplib.SMTP, user: str, token) -> None:
    """AUTH XOAUTH2 with the initial response (SPEC 10).

    A refusing server first answers 334 with its error (base64 JSON); an
    empty line then asks for the final reply.

    Raises:
        smtplib.SMTPAuthenticationError: the final reply, when not 235.
    """
    code, text = smtp.docmd("AUTH", "XOAUTH2 " + token.xoauth2(user))
    if code == 334:
        code, text = smtp.docmd("")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, text)


def _hello(smtp: smtplib.SMTP) -> None:
    """EHLO, or HELO; a refusal is about this relay, not the message."""
    try:
        smtp.ehlo_or_helo_if_needed()
    except smtplib.SMTPHeloError as exc:
        raise SetupFailed("EHLO refused: %d %s" % (exc.smtp_code, reply_text(exc.smtp_error)),
                          exc.smtp_code, exc.smtp_error) from None


def _client_context(skip_verify: bool, cert: Optional[str], key: Optional[str]) -> ssl.SSLContext:
    """TLS towards remotes: system trust store and host name check unless skipVerify."""
    context = ssl.create_default_context()
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _address(addr: str) -> bytes:
    return ("<%s>" % addr).encode("utf-8")


def _transaction(remote: Remote, conn: _Conn, sender: str, rcpts: List[str], message: bytes,
                 reused: bool, refused: Optional[Dict[str, Failure]]) -> str:
    """One MAIL/RCPT/DATA transaction; returns the remote's final reply.
    Refused recipients go into `refused` when given (see Dispatcher.send).

    Raises:
        _Refused: the remote refused; _Stale: see Dispatcher._run; OSError: the connection broke.
    """
    smtp = conn.smtp
    options = []
    if smtp.has_extn("size"):
        options.append(b" SIZE=%d" % len(message))
    if not message.isascii() and smtp.has_extn("8bitmime"):
        options.append(b" BODY=8BITMIME")
    if not (sender.isascii() and all(r.isascii() for r in rcpts)):
        if not smtp.has_extn("smtputf8"):
            # Permanent: this remote can never take these addresses [R6531 3.4].
            raise _Refused(failure.Failure(failure.Kind.PERMANENT, failure.MAIL, remote.masked(),
                                           replies.REMOTE_NO_SMTPUTF8, host=remote.host))
        options.append(b" SMTPUTF8")
    steps: List[Tuple[str, bytes, Optional[str]]] = [(failure.MAIL, b"MAIL FROM:" + _address(sender) + b"".join(options) + b"\r\n", None)]
    steps.extend((failure.RCPT, b"RCPT TO:" + _address(r) + b"\r\n", r) for r in rcpts)
    steps.append((failure.DATA, b"DATA\r\n", None))
    conn.in_step = False
    # No RSET on a reused connection: only connections whose last transaction
    # ended in 2xx go back to the pool, and that leaves no state [R5321 4.1.4].
    # A connection found dead at MAIL was never given the message: retry it.
    if conn.pipelining:
        _write(smtp, b"".join(cmd for _, cmd, _ in steps), stale_ok=reused)
    for index, (stage, cmd, rcpt) in enumerate(steps):
        first = stage == failure.MAIL
        conn.stage = stage
        if not conn.pipelining:
            _write(smtp, cmd, stale_ok=reused and first)
        code, text = _read(smtp, stale_ok=reused and first)
        if reused and code == 421:
            # The remote is closing this old connection (idle limit, messages
            # per connection); no body was sent, so a fresh one may try again.
            raise _Stale("%s answered 421" % stage)
        refusal = _refusal(remote, stage, code, text, rcpt, refused, len(rcpts))
        if refusal is not None:
            owed = len(steps) - index - 1 if conn.pipelining else 0
            conn.in_step = _settle(smtp, owed, code)
            raise _Refused(refusal)
    if message.startswith(b".") or b"\n." in message:
        message = _DOT_LINE.sub(b"..", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    conn.stage = failure.BODY
    _write(smtp, message + b".\r\n", stale_ok=False)
    code, text = _read(smtp, stale_ok=False)
    conn.in_step = True
    if not 200 <= code <= 299:
        raise _Refused(failure.refused(failure.BODY, code, text, remote.masked(), remote.host))
    conn.last_used = time.monotonic()
    return "%d %s" % (code, reply_text(text))


def _refusal(remote: Remote, stage: str, code: int, text: bytes, rcpt: Optional[str],
             refused: Optional[Dict[str, Failure]], total: int) -> Optional[Failure]:
    """The Failure for a refused MAIL, RCPT or DATA, or None to go on.

    With a `refused` dict a refused recipient is recorded there instead,
    and only DATA after every recipient was refused fails (Dispatcher.send).
    """
    if stage == failure.MAIL and code != 250:
        return failure.refused(stage, code, text, remote.masked(), remote.host)
    if stage == failure.RCPT and code not in (250, 251):
        found = failure.refused(stage, code, text, remote.masked(), remote.host, rcpt)
        if refused is None:
            return found
        refused[rcpt] = found
    elif stage == failure.DATA and refused and len(refused) == total:
        return next(iter(refused.values()))
    elif stage == failure.DATA and code != 354:
        return failure.refused(stage, code, text, remote.masked(), remote.host)
    return None


def _settle(smtp: smtplib.SMTP, owed: int, code: int) -> bool:
    """After a refusal answered with `code`, read the `owed` replies to
    commands pipelined after it; True when the remote is back waiting for a
    command. When DATA was accepted (354) it waits for a body instead, which
    must never be sent: the only way out is to drop the connection."""
    try:
        for _ in range(owed):
            code, _ = smtp.getreply()
    except OSError:
        return False
    return code != 354


def _write(smtp: smtplib.SMTP, data: bytes, stale_ok: bool) -> None:
    try:
        smtp.send(data)
    except smtplib.SMTPServerDisconnected as exc:
        if stale_ok:
            raise _Stale(str(exc))
        raise


def _read(smtp: smtplib.SMTP, stale_ok: bool):
    started = time.monotonic()
    try:
        return smtp.getreply()
    except smtplib.SMTPServerDisconnected as exc:
        # A dead pooled connection fails at once; one that waited out the
        # timeout is a slow remote, and retrying would only double the wait.
        if stale_ok and time.monotonic() - started < smtp.timeout:
            raise _Stale(str(exc))
        raise
