"""Every reply the relay sends, as named values (SPEC 3.2, 4.1).

Owns the wire form of a reply and the control-character cleaning of echoed
text. Must not know about sessions or sockets: it only builds values.
"""

import functools
import re
from typing import NamedTuple

_CONTROL = {c: " " for c in range(32)}
_CONTROL[127] = " "
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")  # [R3463 2]


def clean_echo(text: str) -> str:
    """Replace every control character with a space (SPEC 3.2)."""
    return text.translate(_CONTROL)


def is_enhanced_code(word: str) -> bool:
    """True for an RFC 3463 status code such as `5.1.1`."""
    return _ENHANCED_CODE.match(word) is not None


class Reply(NamedTuple):
    """One SMTP reply; `text` may hold several lines separated by "\\n"."""

    code: int
    enhanced: str
    text: str

    def line(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated [R5321 4.2.1]."""
        return _wire_form(self)

    def __str__(self) -> str:
        return self.line().decode("utf-8", "replace").rstrip("\r\n")


# The same few constant replies go out for every command of every message:
# their wire form is built once. Replies are immutable tuples, so a cached
# value can never go stale; the bound keeps per-message replies (accepted(id))
# from growing the cache without limit.
_WIRE_CACHE_SIZE = 256


@functools.lru_cache(maxsize=_WIRE_CACHE_SIZE)
def _wire_form(reply: Reply) -> bytes:
    lines = reply.text.split("\n")
    prefix = "%d %s " % (reply.code, reply.enhanced) if reply.enhanced else "%d " % reply.code
    more = prefix.replace(" ", "-", 1)
    out = [more + t for t in lines[:-1]]
    out.append(prefix + lines[-1])
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


class SmtpError(Exception):
    """Raised by policy or delivery code to answer the client with `reply`."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


# Connection (SPEC 3.1) and session limits (SPEC 3.2)
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")
TIMEOUT = Reply(421, "4.4.2", "Timeout")
SHUTTING_DOWN = Reply(421, "4.3.2", "Shutting down")
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
UNRECOGNIZED = Reply(500, "5.5.2", "Command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")


def greeting(welcome_msg: str) -> Reply:
    return Reply(220, "", welcome_msg)


def too_many_connections(hostname: str) -> Reply:
    return Reply(421, "4.7.0", "%s Too many connections, try again later" % hostname)


# Commands (SPEC 3.2)
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "OK")
RECIPIENT_OK = Reply(250, "2.1.5", "OK")
BYE = Reply(221, "2.0.0", "Bye")
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
MISSING_DOMAIN = Reply(501, "5.5.4", "Syntax: EHLO/HELO domain")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
SYNTAX_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")

READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_OFFERED = Reply(502, "5.5.1", "STARTTLS not offered")
ALREADY_TLS = Reply(503, "5.5.1", "Already running TLS")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_CONTINUE = Reply(334, "", "")
AUTH_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # base64 "Username:" (AUTH LOGIN)
AUTH_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # base64 "Password:"
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_CANCELLED = Reply(501, "5.5.2", "Authentication cancelled")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_PENALTY = Reply(454, "4.7.0", "Too many authentication failures, try again later")
AUTH_BUSY = Reply(454, "4.7.0", "Temporary authentication failure")  # [R4954 6]

NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unrecognized parameter")  # [R5321 4.1.1.11]
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")

NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
RCPT_SYNTAX = Reply(501, "5.1.3", "Syntax: RCPT TO:<address>")
RECIPIENT_NOT_ALLOWED = Reply(550, "5.7.1", "Recipient address not allowed")
NO_ROUTE = Reply(550, "5.7.1", "No remote routes this recipient")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")

NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
TOO_BIG = Reply(552, "5.3.4", "Message too big")


def ehlo(hostname: str, extensions: "list[str]") -> Reply:
    return Reply(250, "", "\n".join([hostname] + extensions))


def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


# Delivery (SPEC 4.1)
def accepted(message_id: str) -> Reply:
    return Reply(250, "2.0.0", "OK %s" % message_id)


SCAN_UNAVAILABLE = Reply(451, "4.3.0", "Message scan unavailable, try again later")
COMMAND_TEMPFAIL = Reply(451, "4.3.0", "External command failed temporarily, try again later")
COMMAND_FAILED = Reply(554, "5.3.0", "External command failed")
FORWARD_TEMPFAIL = Reply(451, "4.4.1", "Forwarding failed, try again later")
NO_REMOTE = Reply(554, "5.3.5", "No remote configured")
# Raised by upstream as if the remote had refused MAIL, so the client gets it
# like any remote 5xx, prefixed by the remote's host (SPEC 4.1) [R6531 3.4].
REMOTE_NO_SMTPUTF8 = Reply(553, "5.6.7", "remote does not support SMTPUTF8")


# The spool (SPEC 9)
def queued(message_id: str) -> Reply:
    return Reply(250, "2.0.0", "OK %s queued" % message_id)


SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")


def expired(last_error: str) -> Reply:
    """What a bounce says of a recipient still pending after queue_lifetime [R3463 3.5]."""
    return Reply(451, "4.4.7", "Delivery time expired, last error: %s" % last_error)


def scan_rejected(code: int, enhanced: str, reason: str) -> Reply:
    """The webhook's reject verdict (SPEC 4.2); the caller ensures a 5xx code."""
    return Reply(code, enhanced, clean_echo(reason))


def remote_refused(code: int, enhanced: str, host: str, text: str) -> Reply:
    """A remote's 5xx passed through, prefixed by the remote host (SPEC 4.1)."""
    return Reply(code, enhanced, clean_echo("%s: %s" % (host, text)).rstrip())


# Remote limits (SPEC 13)
def no_room(remote: str, limit: str) -> Reply:
    """A message that waited remote_wait for room at a remote and got none."""
    return Reply(451, "4.4.5", clean_echo("%s has no room (%s), try again later" % (remote, limit)))


def quota_spent(host: str, text: str) -> Reply:
    """A remote whose sending quota is spent: temporary, with its own words."""
    return Reply(451, "4.4.5", clean_echo("%s: %s" % (host, text)).rstrip())


def is_success(reply: Reply) -> bool:
    """A 2xx or 3xx: the command or the message was taken."""
    return reply.code < 400


def is_refusal(reply: Reply) -> bool:
    """A reply to a command that the session logs as a refusal: 5xx, or 452 (too many)."""
    return reply.code >= 500 or reply.code == 452


# Client limits (SPEC 14)
def too_many_client_connections(address: str) -> Reply:
    return Reply(421, "4.7.0", "Too many connections from %s" % address)


def client_rate_spent(what: str, option: str, rate: str) -> Reply:
    """MAIL or RCPT past a client's rate: try again later."""
    return Reply(450, "4.7.1", "Too many %s from you (%s %s), try again later" % (what, option, rate))
