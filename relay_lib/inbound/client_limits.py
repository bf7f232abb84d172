"""Client limits (SPEC 14): fair to every device behind the relay.

Owns, per client, the sessions it holds, the messages and recipients it has
sent (token buckets from `limits`), the exemption by network, and the rule
of one warning per client and limit a minute. The client is the AUTH user
when the session authenticated, else its address (the PROXY header's,
behind a load balancer). Only what was accepted counts: the session asks
for room before MAIL and RCPT, and charges the message after its 250.
Must not touch a socket: it answers with a Reply or None, and the session
or listener sends it. Counts live in memory only.
"""

import math
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from relay_lib import metrics, replies
from relay_lib.inbound.policy import in_nets
from relay_lib.limits import Concurrency, Keyed, TokenBucket
from relay_lib.logs import fields, log
from relay_lib.replies import Reply

WARN_EVERY = 60.0  # seconds: one warning per client and limit in this time (SPEC 14)
PRUNE_EVERY = 1024  # charges between two passes that forget clients whose buckets are full again


class ClientLimits:
    """The SPEC 14 limits of one relay; thread-safe."""

    def __init__(self, settings, clock: Callable[[], float] = time.monotonic):
        self.max_connections = settings.client_max_connections
        self.message_rate = settings.client_message_rate
        self.recipient_rate = settings.client_recipient_rate
        self.exempt = settings.client_limits_exempt
        self._clock = clock
        self._sessions = Keyed(lambda: Concurrency(self.max_connections or 1))
        self._messages = Keyed(lambda: TokenBucket(self.message_rate, clock))
        self._recipients = Keyed(lambda: TokenBucket(self.recipient_rate, clock))
        self._warned: Dict[Tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._charges = 0

    @property
    def active(self) -> bool:
        return bool(self.max_connections or self.message_rate or self.recipient_rate)

    def is_exempt(self, ip: str) -> bool:
        return bool(self.exempt) and in_nets(ip, self.exempt)

    def connect(self, ip: str) -> Optional[Reply]:
        """A new session from `ip`: None (then `disconnect(ip)` at its end), or the 421."""
        if not self.max_connections or self.is_exempt(ip):
            return None
        with self._sessions.lock:
            held = self._sessions.get(ip)
            if held.room():
                held.take()
                return None
        self._refused(ip, "client_max_connections", "connections")
        return replies.too_many_client_connections(ip)

    def disconnect(self, ip: str) -> None:
        if not self.max_connections or self.is_exempt(ip):
            return
        with self._sessions.lock:
            self._sessions.get(ip).give()
        self._sessions.prune()

    def check_message(self, client: str, ip: str) -> Optional[Reply]:
        """At MAIL: None, or 450 when `client` has sent its client_message_rate."""
        if self.message_rate is None or self.is_exempt(ip):
            return None
        with self._messages.lock:
            if self._messages.get(client).room():
                return None
        self._refused(client, "client_message_rate", "messages")
        return replies.client_rate_spent("messages", "client_message_rate", str(self.message_rate))

    def check_recipients(self, client: str, ip: str, count: int) -> Optional[Reply]:
        """At RCPT: None, or 450 when `count` recipients would pass client_recipient_rate."""
        if self.recipient_rate is None or self.is_exempt(ip):
            return None
        with self._recipients.lock:
            if self._recipients.get(client).room(count):
                return None
        self._refused(client, "client_recipient_rate", "recipients")
        return replies.client_rate_spent("recipients", "client_recipient_rate", str(self.recipient_rate))

    def accepted(self, client: str, ip: str, rcpts: int) -> None:
        """A message from `client` got its 250: it counts, with its recipients."""
        if self.is_exempt(ip):
            return
        for rate, keyed, amount in ((self.message_rate, self._messages, 1),
                                    (self.recipient_rate, self._recipients, rcpts)):
            if rate is not None:
                with keyed.lock:
                    keyed.get(client).charge(amount)
        with self._lock:
            self._charges += 1
            prune = self._charges % PRUNE_EVERY == 0
        if prune:
            self._messages.prune()
            self._recipients.prune()

    def _refused(self, client: str, option: str, limit: str) -> None:
        """Count a refusal; warn about it once a minute per client and limit."""
        metrics.CLIENT_REFUSALS.labels(limit).inc()
        now = self._clock()
        with self._lock:
            if now - self._warned.get((client, option), -math.inf) < WARN_EVERY:
                return
            self._warned[(client, option)] = now
            if len(self._warned) > PRUNE_EVERY:
                self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY}
        log.warning("client limit reached", extra=fields(client=client, limit=option))
