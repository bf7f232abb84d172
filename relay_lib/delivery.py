"""After the final dot: the Received header, then aliases, webhook, command
and remotes, and the mapping of each outcome to its SPEC 4.1 reply.

Owns the order of delivery steps. Must not touch the client socket: it takes
an envelope and the message bytes and returns the one reply for the client.
"""

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import List, Optional, Tuple

from . import replies
from .config import Settings
from .logs import fields, log
from .policy import Aliases
from .replies import Reply


@dataclass
class Envelope:
    """What the session learned about one message before its body."""

    id: str
    peer: str
    helo: str
    user: Optional[str]
    tls: Optional[Tuple[str, str]]
    esmtp: bool
    mail_from: str
    rcpts: List[str] = field(default_factory=list)
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    size: int = 0


def new_message_id() -> str:
    """A short unique id for logs, the Received header and the webhook."""
    return "%x%s" % (int(time.time()), secrets.token_hex(5))


def _printable_helo(helo: str) -> str:
    cleaned = "".join(c for c in helo if " " < c <= "~" and c not in "()<>")
    return cleaned or "unknown"


def received_header(settings: Settings, env: Envelope) -> bytes:
    """The trace header of SPEC 3.3 [R5321 4.4]."""
    proto = "ESMTP" if env.esmtp else "SMTP"
    if env.tls:
        proto += "S"
    if env.user:
        proto += "A"
    tls = " (%s %s)" % env.tls if env.tls else ""
    text = "Received: from %s ([%s])\r\n\tby %s (smtprelay) with %s%s id %s\r\n\tfor <%s>; %s\r\n" % (
        _printable_helo(env.helo), env.peer, settings.hostname, proto, tls, env.id,
        env.rcpts[0] if env.rcpts else "", format_datetime(env.received_at))
    return text.encode("utf-8", "replace")


class Delivery:
    """Runs the delivery steps of SPEC 4 for each message."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.aliases = Aliases(settings.aliases_file)

    def deliver(self, env: Envelope, body: bytes) -> Reply:
        """Deliver one message; returns the client's reply, never raises."""
        started = time.monotonic()
        env.rcpts = [self.aliases.resolve(r) for r in env.rcpts]
        message = received_header(self.settings, env) + body
        env.size = len(message)
        results = []
        reply = replies.accepted(env.id)
        try:
            if not self.settings.remotes:
                reply = replies.NO_REMOTE
            for remote in self.settings.remotes:
                if remote.scheme == "file":
                    write_file(remote.path, env, message)
                    results.append("%s ok" % remote.masked())
        except OSError as exc:
            log.error("file remote failed", extra=fields(id=env.id, error=str(exc)))
            reply = replies.FORWARD_TEMPFAIL
        log.info("message", extra=fields(
            id=env.id, peer=env.peer, user=env.user or "", **{"from": env.mail_from},
            to=",".join(env.rcpts), size=env.size, remotes="; ".join(results),
            result=reply.code, ms=int((time.monotonic() - started) * 1000)))
        return reply

    def close(self) -> None:
        """Release resources held between messages."""


def write_file(folder: str, env: Envelope, message: bytes) -> None:
    """Write `<id>.eml` and `<id>.json` into folder, each atomically."""
    os.makedirs(folder, exist_ok=True)
    meta = {"id": env.id, "peer": env.peer, "helo": env.helo, "username": env.user,
            "tls": bool(env.tls), "from": env.mail_from, "to": env.rcpts,
            "size": len(message),
            "received_at": env.received_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
    _atomic_write(os.path.join(folder, env.id + ".eml"), message)
    _atomic_write(os.path.join(folder, env.id + ".json"),
                  json.dumps(meta, indent=2).encode("utf-8"))


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
