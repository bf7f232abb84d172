"""Remote limits (SPEC 13): one set per account, shared by the remotes with
the same scheme, host, port and user.

Owns, for each account, how many messages may be sent at once (the
connection limit, lowered by throttle replies and raised again by one each
quiet minute), its message and recipient rates, the pause after a spent
quota and the probe that ends it, the warnings about these, their metrics,
and the counts kept in a small file across restarts. Must not talk SMTP:
the dispatcher reserves room before each message and reports what the
remote said.

A message holds one of the account's connection units while it is being
sent. A unit is taken before a connection is opened or reused, and the pool
never keeps more idle connections than the units free, so the connections
open to an account never exceed its limit, idle ones included.
"""

import json
import math
import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from relay_lib import failure, files, metrics, replies
from relay_lib.config.remotes import Remote
from relay_lib.failure import Failure
from relay_lib.limits import Concurrency, Hold, Limiter, Pause, TokenBucket
from relay_lib.logs import fields, log

THROTTLE_PAUSE = 1.0  # seconds before the first retry after a throttle reply; doubles (SPEC 13)
QUIET_MINUTE = 60.0  # seconds without a throttle after which the learned limit rises by one
WARN_EVERY = 60.0  # seconds: at most one throttle warning per account in this time
SAVE_EVERY = 5.0  # seconds between writes of the counts file, at most
STATE_VERSION = 1


class _Learned(Concurrency):
    """The connection limit: lowered by throttle replies, raised by one per quiet minute."""

    def __init__(self, configured: int, clock: Callable[[], float]):
        super().__init__(configured)
        self.configured = configured
        self._clock = clock
        self._changed = 0.0  # when it was last lowered or raised

    def lower(self, still_open: int) -> int:
        self._changed = self._clock()
        self.set_limit(max(1, min(still_open, self.limit)))
        return self.limit

    def room(self, amount: int = 1) -> bool:
        if self.limit < self.configured:
            quiet = int((self._clock() - self._changed) // QUIET_MINUTE)
            if quiet > 0:
                self._changed += quiet * QUIET_MINUTE
                self.set_limit(min(self.configured, self.limit + quiet))
        return super().room(amount)


class Account:
    """The limits of one account and what the remote said of them lately."""

    def __init__(self, label: str, limits, clock: Callable[[], float]):
        self.label = label
        self.connections = _Learned(limits.connections, clock)
        self.rate = TokenBucket(limits.rate, clock) if limits.rate is not None else None
        self.recipients = TokenBucket(limits.recipients, clock) if limits.recipients is not None else None
        self.limits = limits
        self.pause = Pause(clock)
        self.probe = Concurrency(1)  # after a quota pause, one message at a time until one gets through
        self.probing = False
        self.quota: Optional[Failure] = None  # the reply that started the pause
        self.open = 0  # connections open now, idle ones included
        self.warned = -math.inf
        self.open_gauge = metrics.REMOTE_CONNECTIONS_OPEN.labels(label)
        self.limit_gauge = metrics.REMOTE_CONNECTION_LIMIT.labels(label)
        self.limit_gauge.set(limits.connections)

    def want(self, rcpts: int) -> List[Tuple[object, int]]:
        """The limits one message to `rcpts` recipients needs room in."""
        pairs: List[Tuple[object, int]] = [(self.pause, 1), (self.connections, 1)]
        if self.probing:
            pairs.append((self.probe, 1))
        if self.rate is not None:
            pairs.append((self.rate, 1))
        if self.recipients is not None:
            pairs.append((self.recipients, rcpts))
        return pairs

    def short_of(self, rcpts: int) -> str:
        """Which limit has no room, for the reply after a wait ran out."""
        if not self.pause.room():
            return "quota pause"
        if not self.connections.room():
            return "connections=%d" % self.connections.limit
        if self.rate is not None and not self.rate.room():
            return "rate=%s" % (self.limits.rate,)
        if self.recipients is not None and not self.recipients.room(rcpts):
            return "recipients=%s" % (self.limits.recipients,)
        return "throttled"


class Accounts:
    """Every account's limits, one Limiter where messages wait for room.

    Thread-safe. `reserve` waits, in arrival order, until a message may go
    (or returns the Failure that ends the wait); `throttled`, `quota_spent`
    and `delivered` hear what the remote then said.
    """

    def __init__(self, limits_of: Callable[[Remote], Any], wait: float, quota_pause: float,
                 state_path: Optional[str], clock: Callable[[], float] = time.monotonic):
        self._limits_of = limits_of
        self.wait = wait
        self.quota_pause = quota_pause
        self._state_path = state_path
        self._clock = clock
        self.limiter = Limiter(clock)
        self._accounts: Dict[tuple, Account] = {}
        self._by_remote: Dict[Remote, Account] = {}
        self._lock = threading.Lock()
        self._saved = clock()
        self._saved_state: Dict[str, dict] = self._load()

    def of(self, remote: Remote) -> Account:
        account = self._by_remote.get(remote)
        if account is None:
            with self._lock:
                account = self._by_remote.get(remote) or self._make(remote)
        return account

    def _make(self, remote: Remote) -> Account:
        """Holds the lock."""
        limits = self._limits_of(remote)
        account = self._accounts.get(limits.account)
        if account is None:
            account = Account(self._label(remote), limits, self._clock)
            self._restore(account, self._saved_state.get(_key(limits.account)))
            self._accounts[limits.account] = account
        self._by_remote[remote] = account
        return account

    def _label(self, remote: Remote) -> str:
        """The metrics label of a new account: host:port, as the other remote metrics, never the user
        (SPEC 12); a second account at the same endpoint gets #2. Holds the lock."""
        label = base = remote.endpoint
        taken = {a.label for a in self._accounts.values()}
        number = 1
        while label in taken:
            number += 1
            label = "%s#%d" % (base, number)
        return label

    def deadline(self) -> float:
        """The time a message that starts waiting now gives up (remote_wait)."""
        return self._clock() + self.wait

    def reserve(self, remote: Remote, rcpts: int, deadline: float) -> Union[Hold, Failure]:
        """Room for one message to `rcpts` recipients, or the Failure that ends its wait."""
        account = self.of(remote)
        paused = account.pause.until - self._clock()
        if paused > 0 and account.pause.until > deadline and account.quota is not None:
            return _retry_after(account.quota, paused)  # no point waiting: it is paused past the deadline
        started = self._clock()
        hold = self.limiter.try_take(account.want(rcpts))
        if hold is None:
            metrics.REMOTE_WAITING.labels(account.label).inc()
            try:
                hold = self.limiter.take(account.want(rcpts), deadline)
            finally:
                metrics.REMOTE_WAITING.labels(account.label).dec()
            metrics.REMOTE_WAIT_SECONDS.labels(account.label).observe(self._clock() - started)
        if hold is None:
            return self.no_room(remote, account.short_of(rcpts))
        return hold

    def reserve_any(self, remotes: Sequence[Remote], rcpts: Sequence[int],
                    deadline: float) -> Optional[Tuple[int, Hold]]:
        """For a failover group (SPEC 13): room at the first member that has
        it, else at whichever gets room first; None when the wait runs out."""
        wants = [self.of(r).want(n) for r, n in zip(remotes, rcpts)]
        return self.limiter.take_any(wants, deadline)

    def no_room(self, remote: Remote, limit: str) -> Failure:
        """The Failure of a message that waited remote_wait for room (SPEC 13)."""
        account = self.of(remote)
        soonest = account.pause.wait_time()
        for bucket in (account.rate, account.recipients):
            if bucket is not None:
                soonest = max(soonest, bucket.wait_time())
        found = Failure(failure.Kind.TEMPORARY, failure.WAIT, remote.masked(),
                        replies.no_room(remote.masked(), limit), "no room within remote_wait: %s" % limit,
                        remote.host, retry_after=soonest)
        return found

    def throttled(self, remote: Remote, said: Failure) -> None:
        """A throttle reply: lower the learned limit to what is still open (SPEC 13)."""
        account = self.of(remote)
        limit = account.connections.lower(account.open)
        account.limit_gauge.set(limit)
        metrics.REMOTE_THROTTLES.labels(account.label).inc()
        now = self._clock()
        if now - account.warned >= WARN_EVERY:
            account.warned = now
            log.warning("remote throttled", extra=fields(remote=remote.masked(), reply=said.describe(),
                                                          connections=limit))
        self.limiter.notify()

    def quota_spent(self, remote: Remote, said: Failure) -> Failure:
        """A quota reply: nothing for remote_quota_pause, then one probe (SPEC 13)."""
        account = self.of(remote)
        account.pause.pause_until(self._clock() + self.quota_pause)
        account.probing = True
        account.quota = said
        metrics.REMOTE_QUOTA_PAUSES.labels(account.label).inc()
        until = time.time() + self.quota_pause
        log.warning("remote quota spent, paused", extra=fields(
            remote=remote.masked(), reply=said.describe(),
            until=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))))
        self._save(force=True)
        self.limiter.notify()
        return _retry_after(said, self.quota_pause)

    def delivered(self, remote: Remote) -> None:
        """A message got through: a probe after a quota pause has done its job."""
        account = self.of(remote)
        if account.probing:
            account.probing = False
            account.quota = None
            self.limiter.notify()
        self._save()

    def opened(self, remote: Remote) -> None:
        account = self.of(remote)
        account.open += 1
        account.open_gauge.inc()

    def closed(self, remote: Remote) -> None:
        account = self.of(remote)
        account.open -= 1
        account.open_gauge.dec()

    def keeps(self, remote: Remote, idle: int) -> bool:
        """True when the pool may keep one more idle connection for `remote`,
        beside the `idle` ones of its account it holds, while the message
        that used it still holds its unit (SPEC 13)."""
        account = self.of(remote)
        return idle + account.connections.in_use <= account.connections.limit

    def close(self) -> None:
        """Wake every waiting message with "no room" (shutdown), and save the counts."""
        self.limiter.close()
        self._save(force=True)

    def describe(self) -> List[Tuple[str, int, int]]:
        """(label, open, limit) of each account, for tests and -check."""
        with self._lock:
            return [(a.label, a.open, a.connections.limit) for a in self._accounts.values()]

    # ---- counts across restarts (SPEC 13) ---------------------------------

    def _load(self) -> Dict[str, dict]:
        if not self._state_path:
            return {}
        try:
            with open(self._state_path, "rb") as f:
                state = json.loads(f.read().decode("utf-8"))
            if state.get("version") != STATE_VERSION:
                raise ValueError("version %r" % state.get("version"))
            return dict(state["accounts"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("remote limit counts not read, starting from zero",
                        extra=fields(file=self._state_path, error=str(exc)))
            return {}

    def _restore(self, account: Account, saved: Optional[dict]) -> None:
        """Counts saved by an earlier run, refilled for the time since."""
        if not saved:
            return
        try:
            gone = max(0.0, time.time() - float(saved["saved"]))
            for name, bucket in (("rate", account.rate), ("recipients", account.recipients)):
                if bucket is not None and name in saved:
                    bucket.restore(float(saved[name]) + gone * bucket.per_second)
            paused = float(saved.get("paused_until", 0)) - time.time()
            if paused > 0:
                account.pause.pause_until(self._clock() + paused)
                account.probing = True
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("remote limit counts not read", extra=fields(remote=account.label, error=str(exc)))

    def _save(self, force: bool = False) -> None:
        if not self._state_path:
            return
        now = self._clock()
        if not force and now - self._saved < SAVE_EVERY:
            return
        self._saved = now
        wall = time.time()
        with self._lock:
            accounts = dict(self._accounts)
        state: Dict[str, dict] = {}
        for key, account in accounts.items():
            entry: Dict[str, float] = {"saved": wall}
            if account.rate is not None:
                entry["rate"] = account.rate.tokens()
            if account.recipients is not None:
                entry["recipients"] = account.recipients.tokens()
            if account.pause.until > now:
                entry["paused_until"] = wall + (account.pause.until - now)
            state[_key(key)] = entry
        try:
            files.atomic_write(self._state_path, json.dumps(
                {"version": STATE_VERSION, "accounts": state}, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            log.warning("remote limit counts not saved", extra=fields(
                file=self._state_path, error=exc.strerror or str(exc)))


def _key(account: tuple) -> str:
    """An account as a key of the counts file: scheme://user@host:port."""
    scheme, host, port, user = account
    return "%s://%s@%s:%d" % (scheme, user, host, port)


def _retry_after(said: Failure, seconds: float) -> Failure:
    return replace(said, retry_after=seconds)


def state_file(spool_dir: Optional[str]) -> Optional[str]:
    """Where the counts live: beside the queue, only when there is a spool (SPEC 13)."""
    return os.path.join(spool_dir, "limits.json") if spool_dir else None
