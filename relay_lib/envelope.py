"""The envelope of one message, as the session learned it, and its id.

Owns `Envelope` (what every later step reads: peer, HELO, user, TLS,
sender, recipients) and `new_message_id`. Must not know how a message is
delivered.
"""

import itertools
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import List, Optional, Tuple


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


# Unique across restarts (time, a random per-process part) and within the
# process (a counter), with no system call per message.
_ID_PROCESS = secrets.token_hex(4)
_id_counter = itertools.count(1)


def new_message_id() -> str:
    """A short unique id for logs, the Received header, the webhook and file names."""
    return "%x%s%x" % (int(time.time()), _ID_PROCESS, next(_id_counter))
