"""The one failure value: what went wrong, where, and which kind of wrong.

Owns `Failure`, made where a failure is seen (the SMTP client, the webhook,
the command, the outbox, OAuth), and what a remote's reply means: `judge`
reads a code into its kind (SPEC 4.1, 13). Must not decide what happens
next: the outcome policy (delivery/outcome.py) does that, and the pool's
throttle feedback (outbound/) reads only the kind.
"""

import enum
from dataclasses import dataclass, replace
from typing import Optional, Union

from relay_lib.replies import Reply, is_enhanced_code


class Kind(enum.Enum):
    PERMANENT = "permanent"  # the destination will never take it: refuse, bounce
    TEMPORARY = "temporary"  # try again later, or at the next failover member
    THROTTLE = "throttle"  # the remote asks for fewer connections or messages (SPEC 13)
    QUOTA = "quota"  # the remote's sending quota is spent for now (SPEC 13)


# Where a failure was seen. Before MAIL it is about the connection or this
# relay, not the message: never a bounce (SPEC 4.1).
TOKEN, CONNECT, GREETING, EHLO, STARTTLS, AUTH = "token", "connect", "greeting", "EHLO", "STARTTLS", "AUTH"
MAIL, RCPT, DATA, BODY = "MAIL", "RCPT", "DATA", "body"
WEBHOOK, COMMAND, OUTBOX, ROUTE, WAIT, INTERNAL = "webhook", "command", "outbox", "route", "wait", "internal"
SETUP = frozenset((TOKEN, CONNECT, GREETING, EHLO, STARTTLS, AUTH))

_REPLY_TEXT_MAX = 300  # characters of a remote reply kept; a reply line stays under 512 [R5321 4.5.3.1.5]
# SPEC 13: throttle replies before the remote accepted the message.
_THROTTLE_CODES = (421, 432)
_THROTTLE_ENHANCED = ("4.3.2", "4.4.5")
# SPEC 13: "not today": Gmail's 5.4.5, Microsoft's SubmissionQuotaExceededException.
_QUOTA_ENHANCED = "5.4.5"
_QUOTA_TEXT = "SubmissionQuotaExceeded"


@dataclass(frozen=True)
class Failure:
    """One failure, as the place that saw it describes it.

    `reply` is what the other side answered (a remote's reply, or the reply
    the webhook or command step stands for), None when it answered nothing
    (a refused connection, a timeout); `detail` says what happened for the
    log and never holds a password; `host` prefixes a remote's refusal
    passed on to the client; `rcpt` names the one recipient it is about;
    `retry_after` says in how many seconds the remote may have room again
    (SPEC 13: a queued message is tried then, not after queue_retry_min).
    """

    kind: Kind
    stage: str
    destination: str = ""
    reply: Optional[Reply] = None
    detail: str = ""
    host: str = ""
    rcpt: Optional[str] = None
    retry_after: Optional[float] = None

    @property
    def permanent(self) -> bool:
        return self.kind is Kind.PERMANENT

    @property
    def setup(self) -> bool:
        """True when it happened before MAIL: about the connection, not the message."""
        return self.stage in SETUP

    def about(self, rcpt: str) -> "Failure":
        """The same failure, about one recipient."""
        return replace(self, rcpt=rcpt)

    def describe(self) -> str:
        """One line for the log and the queue: what happened, or what was said and to what."""
        if self.detail:
            return self.detail
        if self.reply is None:
            return "%s: no detail" % self.stage
        said = " ".join(filter(None, (str(self.reply.code), self.reply.enhanced, self.reply.text)))
        return "%s refused%s: %s" % (self.stage, " " + self.rcpt if self.rcpt else "", said)

    def __str__(self) -> str:
        return self.describe()


def reply_text(raw: Union[str, bytes]) -> str:
    """A remote's reply text as one printable line, bounded in length.

    smtplib joins the lines of a multi-line reply with "\\n"; an enhanced
    code repeated at the start of each continuation line is dropped.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if "\n" not in raw and raw.isprintable():  # the common case: one plain line
        return raw[:_REPLY_TEXT_MAX]
    lines = str(raw).split("\n")
    first = lines[0].split(None, 1)
    code = first[0] if first and is_enhanced_code(first[0]) else None
    rest = [ln.split(None, 1)[1] if code and ln.startswith(code + " ") else ln for ln in lines[1:]]
    text = " ".join(" ".join([lines[0]] + rest).split())
    return text[:_REPLY_TEXT_MAX]


def remote_said(code: int, raw: Union[str, bytes]) -> Reply:
    """A remote's reply as a Reply, its enhanced code split off when it has
    one of its own class (a 550 that says 4.1.1 has none)."""
    text = reply_text(raw)
    word, _, rest = text.partition(" ")
    if is_enhanced_code(word) and word[0] == str(code)[:1]:
        return Reply(code, word, rest)
    return Reply(code, "", text)


def judge(stage: str, reply: Reply) -> Kind:
    """What a remote's refusal means (SPEC 4.1, 13).

    A 5xx is permanent, except that a spent quota is only "not today" and a
    refusal before MAIL is a refused connection, never a bounce. A 421 or
    432, or a 4xx saying 4.3.2 or 4.4.5, asks us to slow down.
    """
    if reply.code >= 500:
        if reply.enhanced == _QUOTA_ENHANCED or _QUOTA_TEXT in reply.text:
            return Kind.QUOTA
        return Kind.TEMPORARY if stage in SETUP else Kind.PERMANENT
    if reply.code in _THROTTLE_CODES or reply.enhanced in _THROTTLE_ENHANCED:
        return Kind.THROTTLE
    return Kind.TEMPORARY


def refused(stage: str, code: int, raw: Union[str, bytes], destination: str, host: str,
            rcpt: Optional[str] = None, detail: str = "") -> Failure:
    """The Failure for a remote that answered `code` at `stage`."""
    reply = remote_said(code, raw)
    return Failure(judge(stage, reply), stage, destination, reply, detail, host, rcpt)


def temporary(stage: str, destination: str, detail: str, reply: Optional[Reply] = None) -> Failure:
    """A failure that a later try may not have: no answer, a timeout, a step of ours."""
    return Failure(Kind.TEMPORARY, stage, destination, reply, detail)
