"""AUTH at line rate (SPEC 2.4): checked passwords remembered, bcrypt runs
bounded, and a penalty for an address that keeps guessing.

Owns the verification cache, the bcrypt semaphore and the per-address
failure table. Must not keep a password, touch sockets, or read the users file.
"""

import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Hashable, Optional

from relay_lib import replies
from relay_lib.logs import fields, log
from relay_lib.replies import Reply

CACHE_ENTRIES = 10000  # most checked passwords remembered (least recently used out)
FAILED_TTL = 300.0  # a failed check is remembered 5 minutes
PENALTY_FAILURES = 10  # bcrypt-run failures from one address ...
PENALTY_WINDOW = 900.0  # ... within 15 minutes ...
PENALTY_TIME = 900.0  # ... refuse its AUTH for 15 minutes
PENALTY_ADDRESSES = 10000  # most addresses tracked (least recently failed out)
# The 454 of a penalty comes this late, so a guesser looping on it costs
# itself a second per try and the relay one TLS handshake a second, not
# hundreds (as Postfix's smtpd_error_sleep_time).
PENALTY_REPLY_DELAY = 1.0
STRIPES = 64  # locks that keep two sessions from checking the same password at once


class _Lru:
    """A bounded, thread-safe mapping that forgets its least recently used key."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        """The value, or None; a hit becomes the most recently used."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Penalties:
    """Client addresses that failed too many bcrypt-checked AUTHs (SPEC 2.4)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._failures = _Lru(PENALTY_ADDRESSES)  # address -> deque of failure times
        self._until = _Lru(PENALTY_ADDRESSES)  # address -> end of its penalty
        self._lock = threading.Lock()

    def refused(self, address: str) -> bool:
        until = self._until.get(address)
        if until is None:
            return False
        if self._clock() < until:
            return True
        self._until.pop(address)
        return False

    def failed(self, address: str) -> None:
        """Count one failed bcrypt check; the tenth in the window starts the penalty."""
        now = self._clock()
        with self._lock:
            times = self._failures.get(address)
            if times is None:
                times = deque(maxlen=PENALTY_FAILURES)
                self._failures.put(address, times)
            times.append(now)
            if len(times) < PENALTY_FAILURES or now - times[0] > PENALTY_WINDOW:
                return
            self._failures.pop(address)
            self._until.put(address, now + PENALTY_TIME)
        log.warning("too many authentication failures, refusing AUTH from this address",
                    extra=fields(client=address, minutes=int(PENALTY_TIME // 60)))


class AuthGuard:
    """What stands between an AUTH and a bcrypt run.

    check() answers from the cache when it can, else runs `verify` under the
    semaphore and remembers the outcome. Passwords are kept only as a keyed
    hash under a key that lives and dies with the process.
    """

    def __init__(self, ttl: float, wait: float, workers: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.wait = wait
        self.bcrypt_runs = 0  # verify() calls made, for operators and tests
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._cache = _Lru(CACHE_ENTRIES)  # (user, keyed hash, users-file hash) -> (expiry, ok)
        self._slots = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        self._count_lock = threading.Lock()
        self.penalties = Penalties(clock)

    def forget(self) -> None:
        """Drop every remembered check (the users file changed)."""
        self._cache.clear()

    def check(self, address: str, username: str, password: bytes, hashed: bytes,
              verify: Callable[[], bool]) -> Optional[Reply]:
        """None when the password is right, else the Reply to refuse with.

        `hashed` is the users-file hash the password is checked against;
        `verify` runs bcrypt and says whether it matched.
        """
        if self.penalties.refused(address):
            return replies.AUTH_PENALTY
        key = (username.lower(), hashlib.blake2b(password, key=self._key).digest(), hashed)
        remembered = self._remembered(key)
        if remembered is not None:
            return None if remembered else replies.AUTH_FAILED
        # One bcrypt run per password at a time: sessions that bring the same
        # one (20 clients connecting at once) wait for its outcome.
        deadline = time.monotonic() + self.wait
        same_key = self._stripes[hash(key) % len(self._stripes)]
        if not same_key.acquire(timeout=self.wait):
            return replies.AUTH_BUSY
        try:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return replies.AUTH_BUSY
            try:
                ok = self._verify(address, key, verify)
            finally:
                self._slots.release()
        finally:
            same_key.release()
        if ok is None:
            return replies.AUTH_PENALTY
        if ok:
            return None
        return replies.AUTH_FAILED

    def _verify(self, address: str, key, verify: Callable[[], bool]) -> Optional[bool]:
        """The outcome for key, with a bcrypt run unless another session just
        made it; None when the address became penalised while it waited."""
        remembered = self._remembered(key)
        if remembered is not None:
            return remembered
        if self.penalties.refused(address):
            return None
        with self._count_lock:
            self.bcrypt_runs += 1
        ok = verify()
        if self.ttl > 0:
            self._cache.put(key, (self._clock() + (self.ttl if ok else FAILED_TTL), ok))
        if not ok:
            self.penalties.failed(address)
        return ok

    def _remembered(self, key) -> Optional[bool]:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expiry, ok = entry
        if self._clock() >= expiry:
            self._cache.pop(key)
            return None
        return ok
