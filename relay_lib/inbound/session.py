"""The SMTP state machine of one client session (SPEC 3.2, 3.3, 2.4).

Owns the sequence rules (one `GATES` table), the verbs, the MAIL/RCPT syntax,
AUTH, and the per-session limits. Must not touch a socket: it reads lines and
bodies from `Wire` and hands it `Reply` values; decisions come from `policy`
and the message goes to its `Handler` (delivery, or the spool around it).

Theory of operation: `run()` reads one command line at a time, checks the
verb's `GATES` in order (the first one that objects answers), then calls the
verb's method, which may assume its preconditions. `phase` changes only in
`_enter()`. Every failed command passes through `_fail()`, which keeps the
error budget and logs the refusal.
"""

import base64
import binascii
import enum
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Protocol, Tuple

from relay_lib import metrics, replies
from relay_lib.delivery.aliases import Aliases
from relay_lib.envelope import Envelope, new_message_id
from relay_lib.inbound import policy
from relay_lib.inbound.authcache import PENALTY_REPLY_DELAY
from relay_lib.inbound.client_limits import ClientLimits
from relay_lib.inbound.mailpath import parse_path
from relay_lib.inbound.wire import Closed, LineTooLong, NoTLS, Timeout, Wire, WireError
from relay_lib.logs import TRACE, fields, session_logger
from relay_lib.replies import Reply, SmtpError, clean_echo

MAX_ERRORS = 20  # SPEC 3.2: failed commands before 421
MAX_AUTH_FAILURES = 3  # SPEC 3.2: failed AUTH attempts before 421
# A client that speaks HTTP to the SMTP port (a browser, or a cross-protocol
# attack) is cut off at once, as Postfix does.
HTTP_VERBS = (b"GET ", b"POST ", b"CONNECT ", b"HEAD ", b"PUT ")
# SMTP verbs this relay does not implement: an unrecognised line is logged by
# its length only (it may be a password sent out of step in AUTH), plus its
# verb when it is one of these.
OTHER_VERBS = frozenset(("EXPN", "TURN", "ETRN", "ATRN", "BDAT", "SEND", "SOML", "SAML",
                         "XCLIENT", "XFORWARD", "XEXCH50", "X-LINK2STATE"))


class Phase(enum.Enum):
    CONNECTED = "connected"  # greeted, no EHLO/HELO yet
    READY = "ready"          # EHLO/HELO done, no transaction
    MAIL = "mail"            # MAIL FROM accepted
    RCPT = "rcpt"            # at least one RCPT TO accepted


# ---- gates: each returns the refusal, or None to let the verb run ----------
# The sequence rules of SPEC 3.2 in one place. GATES lists, per verb, the
# checks run in order before dispatch; the first objection is the reply, so a
# verb's method may assume every precondition listed here.

def need_helo(s: "Session") -> Optional[Reply]:
    return replies.NEED_HELO if s.phase is Phase.CONNECTED else None


def starttls_offered(s: "Session") -> Optional[Reply]:
    return replies.TLS_NOT_OFFERED if s.starttls_context is None and not s.tls else None


def not_under_tls(s: "Session") -> Optional[Reply]:
    return replies.ALREADY_TLS if s.tls else None


def tls_if_forced(s: "Session") -> Optional[Reply]:
    """local_forcetls: on a STARTTLS listener, MAIL and AUTH wait for TLS."""
    forced = s.settings.local_forcetls and s.starttls_context is not None
    return replies.STARTTLS_FIRST if forced and not s.tls else None


def auth_offered(s: "Session") -> Optional[Reply]:
    return replies.NOT_IMPLEMENTED if s.users is None else None


def auth_under_tls(s: "Session") -> Optional[Reply]:
    return replies.AUTH_NEEDS_TLS if not s.tls else None


def not_authenticated(s: "Session") -> Optional[Reply]:
    return replies.ALREADY_AUTHENTICATED if s.user is not None else None


def auth_if_required(s: "Session") -> Optional[Reply]:
    return replies.AUTH_REQUIRED if s.users is not None and s.user is None else None


def no_transaction(s: "Session") -> Optional[Reply]:
    return replies.NESTED_MAIL if s.phase in (Phase.MAIL, Phase.RCPT) else None


def in_transaction(s: "Session") -> Optional[Reply]:
    return replies.NEED_MAIL if s.phase not in (Phase.MAIL, Phase.RCPT) else None


def has_recipients(s: "Session") -> Optional[Reply]:
    return replies.NEED_RCPT if s.phase is not Phase.RCPT else None


Gate = Callable[["Session"], Optional[Reply]]
GATES: Dict[str, Tuple[Gate, ...]] = {
    "STARTTLS": (starttls_offered, not_under_tls),
    "AUTH": (auth_offered, need_helo, tls_if_forced, auth_under_tls, not_authenticated, no_transaction),
    "MAIL": (need_helo, tls_if_forced, auth_if_required, no_transaction),
    "RCPT": (in_transaction,),
    "DATA": (has_recipients,),
}


class Handler(Protocol):
    """Where a session's messages go: delivery, or the spool around it."""

    def deliver(self, env: Envelope, body: bytes) -> Reply:
        """The client's reply for one message; never raises."""


class Session:
    """One SMTP conversation over a `Wire`, from greeting to close.

    Methods for the caller: run(), and shutdown() from another thread.
    """

    def __init__(self, settings, wire: Wire, peer: str, handler: Handler,
                 users: Optional[policy.Users] = None,
                 aliases: Optional[Aliases] = None,
                 client_limits: Optional[ClientLimits] = None,
                 starttls_context=None, implicit_tls: bool = False):
        self.settings = settings
        self.wire = wire
        self.peer = peer
        self.handler = handler
        self.users = users
        self.aliases = aliases if aliases is not None else Aliases(None)
        self.client_limits = client_limits if client_limits is not None else ClientLimits(settings)
        # Set only on starttls:// listeners: STARTTLS is offered with it.
        self.starttls_context = starttls_context
        self.log = session_logger(peer=peer)
        self.tracing = self.log.isEnabledFor(TRACE)  # asked once: twice per command is on the hot path

        self.phase = Phase.CONNECTED
        self.tls = wire.tls_info() if implicit_tls else None
        self.helo = ""
        self.esmtp = False
        self.user: Optional[str] = None
        self.envelope: Optional[Envelope] = None
        self.smtputf8 = False
        self.errors = 0
        self.auth_failures = 0
        self.closing = False

        # Shutdown (SPEC 6): a session waiting for a command is interrupted;
        # one inside DATA or delivery finishes its message first.
        self._lock = threading.Lock()
        self._idle = False
        self._stopping = False

        self.verbs: Dict[str, Callable[[str], None]] = {
            "EHLO": self.smtp_EHLO,
            "HELO": self.smtp_HELO,
            "STARTTLS": self.smtp_STARTTLS,
            "AUTH": self.smtp_AUTH,
            "MAIL": self.smtp_MAIL,
            "RCPT": self.smtp_RCPT,
            "DATA": self.smtp_DATA,
            "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP,
            "VRFY": self.smtp_VRFY,
            "HELP": self.smtp_HELP,
            "QUIT": self.smtp_QUIT,
        }

    # ---- the loop ----------------------------------------------------------

    def run(self) -> None:
        """Greet, then serve commands until QUIT, a limit, or a timeout.

        Never raises: the one top-level handler logs anything unexpected and
        answers 421 4.3.0 (SPEC 3.2, STYLE 6).
        """
        self.log.debug("connected", extra=fields(tls=bool(self.tls)))
        try:
            self._reply(replies.greeting(self.settings.welcome_msg))
            while not self.closing:
                line = self._next_line()
                if line is None:
                    break
                self.handle(line)
            self.wire.flush()
        except Timeout:
            self.log.warning("timeout, closing", extra=fields(phase=self.phase.value))
            self._last_words(replies.TIMEOUT)
        except Closed as exc:
            if self._stopping:
                self._last_words(replies.SHUTTING_DOWN)
            else:
                self.log.debug("connection closed", extra=fields(reason=str(exc)))
        except Exception:
            self.log.exception("session failed")
            self._last_words(replies.INTERNAL_ERROR)
        self.log.debug("disconnected", extra=fields(errors=self.errors))

    def _next_line(self) -> Optional[bytes]:
        """Read one command line, or None when the relay is shutting down."""
        with self._lock:
            stopping = self._stopping and not self.wire.has_buffered()
        if stopping:
            self._last_words(replies.SHUTTING_DOWN)
            return None
        while True:
            try:
                return self._read_idle()
            except LineTooLong:
                self.log.warning("command line too long")
                if not self._fail(replies.LINE_TOO_LONG):
                    return None

    def _read_idle(self) -> bytes:
        """A line the client owes us with no message in progress (a command,
        an AUTH response): shutdown() may cut this wait short (SPEC 6).

        Raises:
            LineTooLong, Timeout, Closed.
        """
        with self._lock:
            self._idle = True
            if self._stopping:
                self.wire.interrupt()  # complete lines already buffered still come out
        try:
            return self.wire.read_line()
        finally:
            with self._lock:
                self._idle = False

    def shutdown(self) -> None:
        """Ask the session to end (SPEC 6); called from another thread.

        An idle session is woken and answers 421 4.3.2 at once; a busy one
        finishes its message and gets the 421 before its next command.
        """
        with self._lock:
            self._stopping = True
            if self._idle:
                self.wire.interrupt()

    def _last_words(self, reply: Reply) -> None:
        """Send a closing reply when the peer can still hear it."""
        self.closing = True
        if self.tracing:
            self._trace_reply(reply)
        try:
            self.wire.write(reply)
            self.wire.flush()
        except WireError:
            self.log.debug("could not send closing reply", extra=fields(reply=reply.code))

    def handle(self, line: bytes) -> None:
        """Dispatch one command line."""
        if line.startswith(HTTP_VERBS):
            self.log.warning("HTTP request on the SMTP port, closing")
            self.closing = True
            return
        raw_verb, _, raw_arg = line.partition(b" ")
        # bytes.upper() folds ASCII only ('ſ'.upper() would be 'S').
        verb = raw_verb.upper().decode("ascii", "replace")
        method = self.verbs.get(verb)
        if method is None:
            # Never the text: it may be a password (SPEC 6).
            known = {"verb": verb} if verb in OTHER_VERBS else {}
            self._fail(replies.UNRECOGNIZED, length=len(line), **known)
            return
        arg = raw_arg.decode("utf-8", "replace").strip(" ")
        if self.tracing:  # tested here: a call per command costs even when it logs nothing
            self._trace_command(verb, arg)
        for gate in GATES.get(verb, ()):
            refusal = gate(self)
            if refusal is not None:
                self._fail(refusal, verb=verb)
                return
        try:
            method(arg)
        except SmtpError as exc:  # policy or delivery refusing with a specific reply
            self._fail(exc.reply, verb=verb)

    # At trace level the log holds the dialogue itself (SPEC 6); debug
    # keeps to events.

    def _trace_command(self, verb: str, arg: str) -> None:
        if verb == "AUTH":
            # Never log credentials, not even base64 (STYLE 9): keep the mechanism.
            arg = arg.split(" ", 1)[0] + (" ***" if " " in arg else "")
        self.log.log(TRACE, "command", extra=fields(line=clean_echo(("%s %s" % (verb, arg)).rstrip())))

    def _trace_reply(self, reply: Reply) -> None:
        self.log.log(TRACE, "reply", extra=fields(line=str(reply).replace("\r\n", " | ")))

    def _reply(self, reply: Reply) -> None:
        if self.tracing:  # as in handle(): no call per reply unless tracing
            self._trace_reply(reply)
        self.wire.write(reply)

    def _fail(self, reply: Reply, **why) -> bool:
        """Answer a failed command, counting it; False when the session ends.

        The failure that reaches the limit is answered with the 421 instead of
        its own reply (SPEC 3.2).
        """
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.log.warning("too many errors, closing", extra=fields(errors=self.errors))
            self._last_words(replies.TOO_MANY_ERRORS)
            return False
        if replies.is_refusal(reply):
            self.log.warning("refused", extra=fields(reply=str(reply), **why))
        self._reply(reply)
        return True

    def _enter(self, phase: Phase) -> None:
        """The one place where the phase changes."""
        self.phase = phase
        if phase in (Phase.CONNECTED, Phase.READY):
            self.envelope = None
            self.smtputf8 = False

    # ---- verbs -------------------------------------------------------------

    def smtp_EHLO(self, arg: str) -> None:
        if self._hello(arg, esmtp=True):
            self._reply(replies.ehlo(self.settings.hostname, self._extensions()))

    def smtp_HELO(self, arg: str) -> None:
        if self._hello(arg, esmtp=False):
            self._reply(replies.helo(self.settings.hostname))

    def _hello(self, arg: str, esmtp: bool) -> bool:
        """EHLO/HELO: record the name and start over [R5321 4.1.4]."""
        if not arg:
            self._fail(replies.MISSING_DOMAIN)
            return False
        self.helo = arg.split(" ", 1)[0]
        self.esmtp = esmtp
        self._enter(Phase.READY)
        return True

    def _extensions(self) -> List[str]:
        exts = ["PIPELINING", "SIZE %d" % self.settings.max_message_size, "8BITMIME",
                "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.starttls_context is not None and not self.tls:
            exts.append("STARTTLS")
        if self.users is not None and self.tls:
            exts.append("AUTH PLAIN LOGIN")
        return exts

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self._fail(replies.SYNTAX_ARGUMENTS)
            return
        self._reply(replies.READY_TLS)
        try:
            dropped = self.wire.start_tls(self.starttls_context)
        except NoTLS:
            self.log.debug("closed before TLS")
            self.closing = True
            return
        except WireError as exc:
            # Nothing can be said any more: the client is mid-handshake.
            self.log.warning("tls handshake failed", extra=fields(reason=str(exc)))
            self.closing = True
            return
        if dropped:
            # CVE-2011-0411: commands pipelined in plaintext after STARTTLS.
            self.log.warning("dropped plaintext sent after STARTTLS", extra=fields(octets=dropped))
        # RFC 3207 4.2: forget everything learned before TLS.
        self.tls = self.wire.tls_info()
        self.helo = ""
        self.esmtp = False
        self.user = None
        self._enter(Phase.CONNECTED)
        self.log.debug("tls started", extra=fields(version=self.tls[0], cipher=self.tls[1]))

    def smtp_AUTH(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.encode("ascii", "replace").upper().decode("ascii")
        initial = initial.strip(" ")
        if mechanism == "PLAIN":
            credentials = self._auth_plain(initial)
        elif mechanism == "LOGIN":
            credentials = self._auth_login(initial)
        else:
            self._fail(replies.UNKNOWN_MECHANISM, mechanism=clean_echo(mechanism))
            return
        if isinstance(credentials, Reply):
            self._fail(credentials)
            return
        username, password = credentials
        # bcrypt is slow on purpose; when it runs, it runs here, in this
        # session's thread, and Users holds no lock while it hashes.
        user = self.users.authenticate(username, password, self.peer)
        if user is replies.AUTH_PENALTY:
            time.sleep(PENALTY_REPLY_DELAY)
        if isinstance(user, Reply):
            self.auth_failures += 1
            self.log.warning("authentication failed", extra=fields(
                user=clean_echo(username), failures=self.auth_failures, reply=user.code))
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self._last_words(replies.TOO_MANY_AUTH_FAILURES)
                return
            self._fail(user)
            return
        self.user = user
        self.log.bind(user=user)
        self.log.info("authenticated", extra=fields(mechanism=mechanism))
        self._reply(replies.AUTH_OK)

    def _auth_response(self, initial: str, prompt: Reply):
        """The client's next SASL response as bytes, or the Reply to fail with.

        `initial` is the initial response from the AUTH line, if any [R4954 4].
        """
        if initial:
            text = initial.encode("ascii", "replace")
        else:
            self._reply(prompt)
            try:
                text = self._read_idle().strip()
            except LineTooLong:
                return replies.AUTH_BAD_BASE64
            self.log.log(TRACE, "auth response", extra=fields(line="***"))
        if text == b"*":
            return replies.AUTH_CANCELLED
        if text == b"=":  # an empty initial response [R4954 4]
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return replies.AUTH_BAD_BASE64

    def _auth_plain(self, initial: str):
        """(username, password) from SASL PLAIN [R4616 2], or a Reply."""
        response = self._auth_response(initial, replies.AUTH_CONTINUE)
        if isinstance(response, Reply):
            return response
        parts = response.split(b"\0")
        if len(parts) != 3:
            return replies.AUTH_BAD_BASE64
        return _text(parts[1]), _text(parts[2])

    def _auth_login(self, initial: str):
        """(username, password) from the LOGIN exchange, or a Reply."""
        username = self._auth_response(initial, replies.AUTH_USERNAME)
        if isinstance(username, Reply):
            return username
        password = self._auth_response("", replies.AUTH_PASSWORD)
        if isinstance(password, Reply):
            return password
        return _text(username), _text(password)

    def _path_argument(self, arg: str, keyword: str, syntax: Reply,
                       null_ok: bool) -> Optional[Tuple[str, List[str]]]:
        """(address, params) of `FROM:<...>`/`TO:<...>`, or None after failing."""
        head = arg[:len(keyword)]
        try:
            if not (head.isascii() and head.upper() == keyword):  # ASCII-only folding
                raise ValueError("expected %s" % keyword)
            return parse_path(arg[len(keyword):], null_ok)
        except ValueError as exc:
            self._fail(syntax, reason=str(exc))
            return None

    def smtp_MAIL(self, arg: str) -> None:
        parsed = self._path_argument(arg, "FROM:", replies.MAIL_SYNTAX, null_ok=True)
        if parsed is None:
            return
        addr, params = parsed
        smtputf8 = False
        for param in params:
            key, _, value = param.partition("=")
            key = key.encode("ascii", "replace").upper().decode("ascii")
            if key == "SIZE" and value.isdigit() and value.isascii():
                if int(value) > self.settings.max_message_size:
                    self._fail(replies.TOO_BIG, size=value)
                    return
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass  # 8BITMIME is advertised; the body is relayed as it came
            elif key == "SMTPUTF8" and not value:
                smtputf8 = True
            elif key == "AUTH" and value:
                pass  # [R4954 5]: accepted and ignored; we trust our own AUTH
            else:
                # A known parameter with a bad value is a syntax error; an
                # unknown one is 555 [R5321 4.1.1.11].
                known = key in ("SIZE", "BODY", "SMTPUTF8", "AUTH")
                self._fail(replies.SYNTAX_ARGUMENTS if known else replies.UNKNOWN_PARAMETER,
                           param=clean_echo(param))
                return
        if not smtputf8 and not addr.isascii():
            self._fail(replies.NEED_SMTPUTF8, sender=clean_echo(addr))
            return
        refusal = policy.check_sender(self.settings, self.users, self.user, addr)
        if refusal is not None:
            self._fail(refusal, sender=clean_echo(addr), user=self.user or "")
            return
        refusal = self.client_limits.check_message(self.client, self.peer)
        if refusal is not None:
            self._fail(refusal)  # the limit warns once a minute, not per refusal (SPEC 14)
            return
        self.envelope = Envelope(id=new_message_id(), peer=self.peer, helo=self.helo,
                                 user=self.user, tls=self.tls, esmtp=self.esmtp,
                                 mail_from=addr)
        self.smtputf8 = smtputf8
        self._enter(Phase.MAIL)
        self.log.bind(id=self.envelope.id)
        self._reply(replies.SENDER_OK)

    def smtp_RCPT(self, arg: str) -> None:
        parsed = self._path_argument(arg, "TO:", replies.RCPT_SYNTAX, null_ok=False)
        if parsed is None:
            return
        addr, params = parsed
        if params:  # no RCPT extension (DSN) is advertised
            self._fail(replies.UNKNOWN_PARAMETER, param=clean_echo(params[0]))
            return
        if not self.smtputf8 and not addr.isascii():
            self._fail(replies.NEED_SMTPUTF8, rcpt=clean_echo(addr))
            return
        if len(self.envelope.rcpts) >= self.settings.max_recipients:
            self._fail(replies.TOO_MANY_RECIPIENTS, rcpt=clean_echo(addr))
            return
        refusal = (policy.check_recipient(self.settings, addr)
                   or policy.check_route(self.settings, self.aliases,
                                         self.envelope.mail_from, addr))
        if refusal is not None:
            self._fail(refusal, rcpt=clean_echo(addr))
            return
        refusal = self.client_limits.check_recipients(self.client, self.peer, len(self.envelope.rcpts) + 1)
        if refusal is not None:
            self._fail(refusal)
            return
        self.envelope.rcpts.append(addr)
        self._enter(Phase.RCPT)
        self._reply(replies.RECIPIENT_OK)

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            self._fail(replies.SYNTAX_ARGUMENTS)
            return
        self._reply(replies.START_DATA)
        envelope = self.envelope
        self._enter(Phase.READY)
        try:
            body, size = self.wire.read_data(self.settings.max_message_size)
        except Timeout:
            self.log.warning("timeout, closing", extra=fields(phase="data"))
            self._last_words(replies.TIMEOUT)
            return
        metrics.RECEIVED_BYTES.add(size)
        if body is None:
            metrics.MESSAGES.labels("rejected").inc()
            self.log.warning("message too big", extra=fields(
                size=size, limit=self.settings.max_message_size))
            self._fail(replies.TOO_BIG)
            return
        envelope.received_at = datetime.now(timezone.utc)
        reply = self.handler.deliver(envelope, body)
        if replies.is_success(reply):
            self.client_limits.accepted(self.client, self.peer, len(envelope.rcpts))
        self._reply(reply)

    @property
    def client(self) -> str:
        """Whom the client limits count (SPEC 14): the AUTH user, else the address."""
        return self.user if self.user is not None else self.peer

    def smtp_RSET(self, arg: str) -> None:
        self._enter(Phase.READY if self.phase is not Phase.CONNECTED else Phase.CONNECTED)
        self._reply(replies.OK)

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(replies.OK)

    def smtp_VRFY(self, arg: str) -> None:
        self._reply(replies.VRFY)

    def smtp_HELP(self, arg: str) -> None:
        self._reply(replies.HELP)

    def smtp_QUIT(self, arg: str) -> None:
        self.closing = True
        self._reply(replies.BYE)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
