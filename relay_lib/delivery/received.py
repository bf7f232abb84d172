"""The Received trace header the relay adds to every message (SPEC 3.3).

Owns its text [R5321 4.4] and the date format it carries. Must not change
anything else in the message.
"""

import re
from datetime import datetime
from email.utils import format_datetime
from typing import Optional, Tuple

from relay_lib.config.settings import Settings
from relay_lib.envelope import Envelope

_NOT_IN_HELO = re.compile(r"[^!-~]|[()<>]")  # SPEC 3.3: printable ASCII without ()<>


def _printable_helo(helo: str) -> str:
    return _NOT_IN_HELO.sub("", helo) or "unknown"


_last_date: Tuple[Optional[datetime], str] = (None, "")  # (whole second, its RFC 5322 text): one format per second


def _rfc5322_date(moment: datetime) -> str:
    """The Received header's date [R5322 3.3], formatted once a second (it is on the hot path)."""
    global _last_date
    second = moment.replace(microsecond=0)
    cached = _last_date
    if cached[0] != second:
        cached = (second, format_datetime(second))
        _last_date = cached  # one tuple assignment: safe to race between threads
    return cached[1]


def received_header(settings: Settings, env: Envelope) -> bytes:
    """The trace header of SPEC 3.3 [R5321 4.4]."""
    proto = "ESMTP" if env.esmtp else "SMTP"
    if env.tls:
        proto += "S"
    if env.user:
        proto += "A"
    tls = " (%s %s)" % env.tls if env.tls else ""
    # `for` only with one recipient, as Postfix: every copy carries this
    # header, and naming one recipient would show a Bcc to the others.
    rcpt = "\r\n\tfor <%s>" % env.rcpts[0] if len(env.rcpts) == 1 else ""
    text = "Received: from %s ([%s])\r\n\tby %s (smtprelay) with %s%s id %s%s; %s\r\n" % (
        _printable_helo(env.helo), env.peer, settings.hostname, proto, tls, env.id,
        rcpt, _rfc5322_date(env.received_at))
    return text.encode("utf-8", "replace")
