"""Limits: how much may happen at once and how fast, at either end of the
relay (SPEC 13 towards remotes, SPEC 14 towards clients).

Owns the limit types (`Concurrency`, `TokenBucket`, `Pause`), keyed sets of
them (`Keyed`), the rate grammar `N/UNIT`, and `Limiter`, the one place
where callers wait for room: several limits taken at once or not at all,
waiters served in arrival order per limit, each giving up at its deadline.
Must not do I/O or log: time comes from an injected clock.

Thread safety: a limit is changed only under its Limiter's lock, or, for a
limit used without one (the client checks of SPEC 14), under the caller's
own lock (`Keyed` has one).
"""

import math
import threading
import time
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_WAIT = 1.0  # seconds of one wait on the condition: a missed wake-up costs at most this


class Rate(NamedTuple):
    """N per UNIT: up to `count` at once, then `count` per `per` seconds on average."""

    count: int  # type: ignore[assignment]  # the field shadows tuple.count, on purpose
    per: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(text: str) -> Rate:
    """`N/UNIT`, UNIT one of s, m, h, d (SPEC 13).

    Raises:
        ValueError: with a short reason for the config error.
    """
    count, sep, unit = text.partition("/")
    if not sep or unit not in UNITS:
        raise ValueError("%r must be N/UNIT with UNIT s, m, h or d (30/m)" % text)
    if not count.isdigit() or not count.isascii() or int(count) <= 0:
        raise ValueError("%r: N must be a positive whole number" % text)
    return Rate(int(count), UNITS[unit], "%d/%s" % (int(count), unit))


class Concurrency:
    """At most `limit` holders at once; `set_limit` may lower it below those holding."""

    def __init__(self, limit: int):
        self._limit = limit
        self.in_use = 0

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, limit)

    def room(self, amount: int = 1) -> bool:
        return self.in_use + amount <= self._limit

    def wait_time(self, amount: int = 1) -> float:
        return 0.0 if self.room(amount) else math.inf  # only a give() makes room

    def take(self, amount: int = 1) -> None:
        self.in_use += amount

    def give(self, amount: int = 1) -> None:
        self.in_use -= amount

    def idle(self) -> bool:
        return self.in_use == 0


class TokenBucket:
    """A rate: a burst of `count`, refilled at `count` per `per` seconds.

    Tokens may go below zero (`charge`): what was accepted past the limit is
    owed, and paid back by the refill before anything else gets room.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(rate.count)
        self.per_second = rate.count / rate.per
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        return self._tokens

    def room(self, amount: int = 1) -> bool:
        # More than a burst goes once the bucket is full, rather than never.
        return self._refill() >= min(amount, self.burst)

    def wait_time(self, amount: int = 1) -> float:
        short = min(amount, self.burst) - self._refill()
        return max(0.0, short / self.per_second)

    def take(self, amount: int = 1) -> None:
        self._refill()
        self._tokens -= amount

    charge = take  # the same arithmetic; called after the fact, past the limit or not

    def refund(self, amount: int) -> None:
        self._tokens = min(self.burst, self._refill() + amount)

    def give(self, amount: int = 1) -> None:
        """Spent is spent: a Hold's release gives nothing back to a rate."""

    def tokens(self) -> float:
        return self._refill()

    def restore(self, tokens: float) -> None:
        """Load a level saved earlier (counts across a restart, SPEC 13)."""
        self._refill()
        self._tokens = max(-self.burst * 1000, min(self.burst, tokens))

    def idle(self) -> bool:
        """A full bucket is the same as a new one."""
        return self._refill() >= self.burst


class Pause:
    """Closed until a time (a remote whose quota is spent, SPEC 13)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.until = 0.0

    def pause_until(self, moment: float) -> None:
        self.until = moment

    def room(self, amount: int = 1) -> bool:
        return self._clock() >= self.until

    def wait_time(self, amount: int = 1) -> float:
        return max(0.0, self.until - self._clock())

    def take(self, amount: int = 1) -> None:
        """Nothing is taken: a pause only closes."""

    give = take

    def idle(self) -> bool:
        return self.room()


Want = Sequence[Tuple[Any, int]]  # (limit, amount) pairs, taken all at once


class Hold:
    """Room taken in a Limiter; release() gives the concurrency back, once."""

    __slots__ = ("_limiter", "_want")

    def __init__(self, limiter: "Limiter", want: Want):
        self._limiter, self._want = limiter, want

    def release(self) -> None:
        want, self._want = self._want, ()
        if want:
            self._limiter._give(want)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Waiter:
    __slots__ = ("limits",)

    def __init__(self, wants: Sequence[Want]):
        self.limits = {id(limit) for want in wants for limit, _ in want}


class Limiter:
    """Where messages wait for room. Thread-safe.

    Fairness: a waiter may not take a limit that an earlier waiter still
    waits for; waiters on other limits do not hold each other up.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: List[_Waiter] = []
        self._closed = False

    def try_take(self, want: Want) -> Optional[Hold]:
        """Room now, or None; never waits, never jumps the queue."""
        with self._cond:
            if not self._free(want, None) or not self._has_room(want):
                return None
            return self._take(want)

    def take(self, want: Want, deadline: float) -> Optional[Hold]:
        """Wait until every limit has room, then take them all; None at `deadline`."""
        found = self.take_any([want], deadline)
        return found[1] if found is not None else None

    def take_any(self, wants: Sequence[Want], deadline: float) -> Optional[Tuple[int, Hold]]:
        """The first want that has room now, else whichever gets room first
        (the earlier one when several do at once); None at `deadline`."""
        with self._cond:
            waiter = _Waiter(wants)
            self._queue.append(waiter)
            try:
                while True:
                    soonest = math.inf
                    for index, want in enumerate(wants):
                        if self._free(want, waiter):
                            if self._has_room(want):
                                return index, self._take(want)
                            soonest = min(soonest, max(limit.wait_time(amount) for limit, amount in want))
                    left = deadline - self._clock()
                    if left <= 0 or self._closed:
                        return None
                    self._cond.wait(min(left, soonest, MAX_WAIT))
            finally:
                self._queue.remove(waiter)
                self._cond.notify_all()  # those behind it may go now

    def waiting(self, limit) -> int:
        """How many waiters want `limit` now (a gauge)."""
        with self._cond:
            return sum(1 for w in self._queue if id(limit) in w.limits)

    def notify(self) -> None:
        """A limit changed from outside (a new limit, a pause, a clock moved): look again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Shutdown: no one waits any more; room that is free is still taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _free(self, want: Want, me: Optional[_Waiter]) -> bool:
        """No earlier waiter wants any of these limits. Holds the lock."""
        for waiter in self._queue:
            if waiter is me:
                return True
            if any(id(limit) in waiter.limits for limit, _ in want):
                return False
        return True

    @staticmethod
    def _has_room(want: Want) -> bool:
        return all(limit.room(amount) for limit, amount in want)

    def _take(self, want: Want) -> Hold:
        for limit, amount in want:
            limit.take(amount)
        return Hold(self, want)

    def _give(self, want: Want) -> None:
        with self._cond:
            for limit, amount in want:
                limit.give(amount)
            self._cond.notify_all()


class Keyed:
    """Limits made on first use per key (a client, an account); `prune` drops
    the ones that are as good as new, so the set stays bounded."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self._limits: Dict[Hashable, Any] = {}
        self.lock = threading.RLock()  # held around a get() by callers that then use the limit

    def get(self, key: Hashable):
        limit = self._limits.get(key)
        if limit is None:
            with self.lock:
                limit = self._limits.setdefault(key, self._factory())
        return limit

    def prune(self) -> int:
        """Drop idle limits; returns how many were dropped."""
        with self.lock:
            idle = [key for key, limit in self._limits.items() if limit.idle()]
            for key in idle:
                del self._limits[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._limits)
