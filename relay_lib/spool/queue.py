"""The store-and-forward queue of SPEC 9: the files under spool_dir, loading
them at start-up, the retry schedule and its threads, bounces, the size
limit, and the -queue, -flush and -delete commands.

Owns everything under spool_dir. Must not speak SMTP or HTTP. Wraps
delivery: with a spool, the session hands its messages to `Spool.deliver`,
which runs delivery's steps and keeps what they could not finish; a retry
runs the steps a queued message still owes (`Delivery.run_steps`).
"""

import ctypes
import heapq
import json
import os
import random
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

from relay_lib import files, metrics, replies
from relay_lib.config.settings import ConfigError, Settings
from relay_lib.delivery import outcome, routing
from relay_lib.delivery.jobs import DELIVERED, DISCARDED, PENDING, REFUSED, Job, Pair
from relay_lib.delivery.steps import Attempt, Delivery
from relay_lib.envelope import Envelope, new_message_id
from relay_lib.failure import Failure
from relay_lib.logs import fields, log
from relay_lib.replies import Reply
from relay_lib.spool import dsn

QUEUE, FAILED, CORRUPT = "queue", "failed", "corrupt"
FLUSH_FILE = "flush"  # -flush creates it; the running relay checks for it every second
FLUSH_CHECK = 1.0  # seconds (SPEC 9)
MAX_WORKERS = 4  # retries at once (SPEC 9)
JITTER = 0.1  # up to 10 % is added to each retry delay, so a burst does not retry in step
STATE_VERSION = 1


def _folder(settings: Settings, name: str) -> str:
    return os.path.join(settings.spool_dir, name)


def sync_folder(folder: str) -> None:
    """Make the renames in `folder` durable. Windows cannot open a folder
    (os.open fails) and NTFS journals renames itself, so there it is skipped."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """Makes what concurrent writers put in one file system durable with one
    syncfs(2) for all of them, where an fsync per file would make each
    message wait for journal commits of its own (Linux only, see `open`)."""

    class _Batch:
        __slots__ = ("done", "error")

        def __init__(self):
            self.done = False
            self.error: Optional[OSError] = None

    def __init__(self, syncfs, folder: str):
        self._syncfs = syncfs
        self._fd = os.open(folder, os.O_RDONLY)
        self._cond = threading.Condition()
        self._open: Optional[GroupSync._Batch] = None  # writers waiting for the next sync
        self._running = False

    @classmethod
    def open(cls, folder: str) -> Optional["GroupSync"]:
        """A GroupSync for `folder`'s file system, or None where the C library has no syncfs."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            syncfs = ctypes.CDLL(None, use_errno=True).syncfs  # CDLL calls release the GIL
        except (OSError, AttributeError):
            return None
        syncfs.argtypes = [ctypes.c_int]
        return cls(syncfs, folder)

    def sync(self) -> None:
        """Return once everything written before the call is on disk.

        Raises:
            OSError: the file system reported a write error.
        """
        with self._cond:
            batch = self._open = self._open or GroupSync._Batch()
            while not batch.done:
                if self._running:
                    self._cond.wait()
                    continue
                # Lead this batch; writers arriving meanwhile form the next one.
                self._running, self._open = True, None
                self._cond.release()
                try:
                    if self._syncfs(self._fd) != 0:
                        code = ctypes.get_errno()
                        batch.error = OSError(code, os.strerror(code))
                finally:
                    self._cond.acquire()
                    batch.done, self._running = True, False
                    self._cond.notify_all()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        os.close(self._fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # already gone is what we wanted


def move(settings: Settings, message_id: str, folder: str, exts=(".eml", ".json")) -> None:
    """Move a message's files from queue/ to `folder` (failed, corrupt), the body first."""
    source_dir, target = _folder(settings, QUEUE), _folder(settings, folder)
    for ext in exts:
        source = os.path.join(source_dir, message_id + ext)
        if os.path.exists(source):
            os.replace(source, os.path.join(target, message_id + ext))
    sync_folder(target)
    sync_folder(source_dir)


# -- the state file: <id>.json beside <id>.eml ---------------------------------

def _state(job: Job, created: float, attempts: int, due: float) -> dict:
    env = job.env
    return {
        "version": STATE_VERSION, "id": env.id, "created": created, "attempts": attempts,
        "next_attempt": due, "last_error": job.error, "scan": job.scan, "command": job.command,
        "envelope": {"peer": env.peer, "helo": env.helo, "user": env.user,
                     "tls": list(env.tls) if env.tls else None, "esmtp": env.esmtp,
                     "from": env.mail_from, "to": env.rcpts, "size": env.size,
                     "received_at": env.received_at.isoformat()},
        "pairs": [{"dest": p.dest, "rcpt": p.rcpt, "state": p.state, "reply": p.reply,
                   "notified": p.notified} for p in job.pairs],
    }


def _job(state: dict, message: bytes) -> Job:
    """The job a state file describes.

    Raises:
        KeyError, TypeError, ValueError: the state is not one this relay wrote.
    """
    e = state["envelope"]
    env = Envelope(id=state["id"], peer=e["peer"], helo=e["helo"], user=e["user"],
                   tls=tuple(e["tls"]) if e["tls"] else None, esmtp=bool(e["esmtp"]),
                   mail_from=e["from"], rcpts=list(e["to"]),
                   received_at=datetime.fromisoformat(e["received_at"]), size=int(e["size"]))
    pairs = [Pair(**p) for p in state["pairs"]]
    if any(p.state not in (PENDING, DELIVERED, REFUSED, DISCARDED) for p in pairs):
        raise ValueError("unknown pair state")
    return Job(env, message, scan=bool(state["scan"]), command=bool(state["command"]),
               pairs=pairs, error=str(state["last_error"]))


def _read_state(path: str) -> dict:
    """Raises OSError or ValueError (bad JSON, wrong version)."""
    with open(path, "rb") as f:
        state = json.loads(f.read().decode("utf-8"))
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("not a state file of this relay")
    return state


def _encode(state: dict) -> bytes:
    # One line: an indent would make json use its pure-Python encoder, per message.
    return json.dumps(state, ensure_ascii=False).encode("utf-8")


class _Entry:
    """What the scheduler keeps in memory about one queued message."""

    __slots__ = ("id", "due", "size", "created", "busy")

    def __init__(self, message_id: str, due: float, size: int, created: float):
        self.id = message_id
        self.due = due
        self.size = size
        self.created = created
        self.busy = False


class Spool:
    """The queue of one relay, and the session's handler when there is one:
    start(), deliver() for each message, stop() and join()."""

    def __init__(self, settings: Settings, delivery: Delivery):
        self.settings = settings
        self.delivery = delivery
        self.queue_dir = _folder(settings, QUEUE)
        self._entries: Dict[str, _Entry] = {}
        self._heap: List[Tuple[float, str]] = []
        self._bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._next_flush_check = 0.0
        self._threads: List[threading.Thread] = []
        self._group: Optional[GroupSync] = None

    # ---- lifecycle ------------------------------------------------------

    def start(self) -> None:
        """Create the folders, pick up what is queued, start the retry threads.

        Raises:
            ConfigError: spool_dir cannot be created.
        """
        for name in (QUEUE, FAILED, CORRUPT):
            try:
                os.makedirs(_folder(self.settings, name), exist_ok=True)
            except OSError as exc:
                raise ConfigError("spool_dir", "cannot create %s: %s" % (
                    _folder(self.settings, name), exc.strerror or exc)) from None
        self._load()
        self._group = GroupSync.open(self.queue_dir)
        for number in range(MAX_WORKERS):
            thread = threading.Thread(target=self._work, name="smtprelay-spool-%d" % number,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        metrics.register_queue(self.stats)

    def stop(self) -> None:
        """No new attempt starts from now on; attempts in progress go on (see join)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        """Wait for the attempts in progress to finish, up to `timeout` seconds."""
        self.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))
        metrics.register_queue(None)
        running = [t.name for t in self._threads if t.is_alive()]
        if self._group is not None and not running:
            self._group.close()
            self._group = None
        if running:
            log.warning("queue attempts still running at shutdown", extra=fields(count=len(running)))

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._entries)

    def stats(self) -> Tuple[int, int, float]:
        """(messages, bytes, age of the oldest in seconds) for the queue gauges (SPEC 12)."""
        with self._cond:
            oldest = min((e.created for e in self._entries.values()), default=None)
            return len(self._entries), self._bytes, time.time() - oldest if oldest is not None else 0.0

    # ---- a new message ---------------------------------------------------

    def deliver(self, env: Envelope, body: bytes) -> Reply:
        """The session's handler with a spool (SPEC 9): delivery's steps run
        while the client waits (only the webhook in always mode); what they
        leave pending is queued, what was refused for good is bounced."""
        attempt = self.delivery.attempt(env, body, keep_going=True,
                                        scan_only=self.settings.spool_mode == "always")
        reply = self._settle(attempt)
        self.delivery.record(attempt, reply, queued=reply == replies.queued(env.id))
        return reply

    def close(self) -> None:
        """Close what delivery holds open (its pooled connections)."""
        self.delivery.close()

    def _settle(self, attempt: Attempt) -> Reply:
        """The client's reply for a message its steps were run for once."""
        job, env = attempt.job, attempt.env
        first = outcome.client_reply(attempt.failure) if attempt.failure else None
        if job is None:  # it never got as far as a job: nothing to queue
            return first or replies.accepted(env.id)
        refused = [p for p in job.pairs if p.state == REFUSED]
        if not job.pending():
            if refused and not any(p.state in (DELIVERED, DISCARDED) for p in job.pairs):
                return first  # as without a spool; no bounce
            self._bounce(job, refused)
            return replies.accepted(env.id)
        for pair in refused:
            pair.notified = True  # bounced below, once the message is safe on disk
        always = self.settings.spool_mode == "always"
        now = time.time()
        due = now if always else now + self._delay(1, attempt.failure)
        if not self._store(job, 0 if always else 1, due, job.error or "spool_mode always"):
            return first or replies.SPOOL_FULL
        self._bounce(job, refused)
        return replies.queued(env.id)

    # ---- storing -----------------------------------------------------------

    def _store(self, job: Job, attempts: int, due: float, reason: str) -> bool:
        """Write a new message and its state durably; False when it is not queued."""
        env = job.env
        state = _encode(_state(job, env.received_at.timestamp(), attempts, due))
        size = len(job.message) + len(state)
        with self._cond:
            if self._bytes + size > self.settings.spool_max_size:
                self._drop_deleted()
            if self._bytes + size > self.settings.spool_max_size:
                log.warning("queue full, not queued", extra=fields(
                    id=env.id, size=size, queued_bytes=self._bytes,
                    limit=self.settings.spool_max_size))
                return False
            self._bytes += size  # reserved while writing, so two writers cannot overshoot
        eml, path = self._paths(env.id)
        written: List[str] = []
        try:
            if self._group is None:
                files.atomic_write(eml, job.message)
                files.atomic_write(path, state)  # the state file is what makes it queued
                sync_folder(self.queue_dir)
            else:
                written.append(files.write_temporary(eml, job.message, sync=False))
                written.append(files.write_temporary(path, state, sync=False))
                self._group.sync()  # both contents are on disk before either name
                os.replace(written[0], eml)
                os.replace(written[1], path)
                self._group.sync()  # and now the names
        except OSError as exc:
            for leftover in written + [path, eml]:
                try:
                    _unlink(leftover)
                except OSError:
                    pass  # the write failed on this disk; report that error
            with self._cond:
                self._bytes -= size
            log.error("cannot queue", extra=fields(id=env.id, error=exc.strerror or str(exc)))
            return False
        with self._cond:
            self._entries[env.id] = _Entry(env.id, due, size, env.received_at.timestamp())
            heapq.heappush(self._heap, (due, env.id))
            self._cond.notify()
        log.info("queued", extra=fields(id=env.id, reason=reason))
        return True

    def _drop_deleted(self) -> None:
        """Forget what -delete moved away since its last attempt, so its bytes
        are free now rather than at its next due time. Holds the lock."""
        for entry in list(self._entries.values()):
            if not entry.busy and not os.path.exists(self._paths(entry.id)[1]):
                self._forget(entry)

    def _paths(self, message_id: str) -> Tuple[str, str]:
        base = os.path.join(self.queue_dir, message_id)
        return base + ".eml", base + ".json"

    def _delay(self, attempts: int, failure: Optional[Failure]) -> float:
        """queue_retry_min, doubled for each attempt made, up to queue_retry_max, plus
        jitter; or, when a remote's limits held the message back, the time until
        it has room (SPEC 13)."""
        if failure is not None and failure.retry_after is not None:
            return failure.retry_after
        s = self.settings
        base = min(s.queue_retry_min * 2 ** min(attempts - 1, 64), s.queue_retry_max)
        return base * (1 + random.uniform(0, JITTER))

    # ---- start-up ------------------------------------------------------------

    def _load(self) -> None:
        """Pick up the queue; remove what never got a 250; set aside what cannot be read."""
        names = set(os.listdir(self.queue_dir))
        for name in sorted(names):
            path = os.path.join(self.queue_dir, name)
            stem, ext = os.path.splitext(name)
            if name.startswith(files.TEMP_PREFIX):
                _unlink(path)
                log.info("removed a half-written queue file", extra=fields(file=name))
            elif ext == ".eml" and stem + ".json" not in names:
                _unlink(path)
                log.info("removed a message without its state", extra=fields(id=stem))
            elif ext == ".json" and stem + ".eml" not in names and os.path.exists(
                    os.path.join(_folder(self.settings, FAILED), stem + ".eml")):
                move(self.settings, stem, FAILED, (".json",))  # a move to failed/ that a crash cut short
            elif ext == ".json":
                self._load_one(stem, path, stem + ".eml" in names)
        flush = _folder(self.settings, FLUSH_FILE)
        if os.path.exists(flush):
            _unlink(flush)
        log.info("queue loaded", extra=fields(messages=len(self._entries), bytes=self._bytes))

    def _load_one(self, message_id: str, path: str, has_body: bool) -> None:
        try:
            if not has_body:
                raise ValueError("its message file is missing")
            state = _read_state(path)
            # A restart often follows a fix (a password, a route): retry soon.
            due = min(float(state["next_attempt"]), time.time() + self.settings.queue_retry_min)
            created = float(state["created"])
            size = os.path.getsize(path)
            size += os.path.getsize(path[:-len(".json")] + ".eml")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("unreadable queue file moved to corrupt/", extra=fields(
                id=message_id, error=str(exc)))
            move(self.settings, message_id, CORRUPT)
            return
        self._entries[message_id] = _Entry(message_id, due, size, created)
        heapq.heappush(self._heap, (due, message_id))
        self._bytes += size

    # ---- the retry threads -------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                entry = self._take()
                if entry is None:
                    return
            try:
                self._attempt(entry)
            # A bug in one attempt must not end the thread: the message stays
            # queued and is tried again after the usual delay.
            except Exception:  # noqa: BLE001
                log.exception("queue attempt failed", extra=fields(id=entry.id))
                self._reschedule(entry, time.time() + self.settings.queue_retry_max)

    def _take(self) -> Optional[_Entry]:
        """The next due message, marked busy; waits for one. None once stopping. Holds the lock."""
        while not self._stopping:
            now = time.time()
            if time.monotonic() >= self._next_flush_check:
                self._next_flush_check = time.monotonic() + FLUSH_CHECK
                self._check_flush(now)
            while self._heap:
                due, message_id = self._heap[0]
                entry = self._entries.get(message_id)
                if entry is None or entry.busy or entry.due != due:
                    heapq.heappop(self._heap)  # forgotten, taken or rescheduled since
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                entry.busy = True
                return entry
            wait = min(self._heap[0][0] - now, FLUSH_CHECK) if self._heap else FLUSH_CHECK
            self._cond.wait(max(wait, 0.001))
        return None

    def _check_flush(self, now: float) -> None:
        """-flush: every queued message is due now. Holds the lock."""
        flush = _folder(self.settings, FLUSH_FILE)
        if not os.path.exists(flush):
            return
        _unlink(flush)
        log.info("flush requested", extra=fields(messages=len(self._entries)))
        for entry in self._entries.values():
            entry.due = now
        self._heap = [(now, e.id) for e in self._entries.values() if not e.busy]
        heapq.heapify(self._heap)

    def _reschedule(self, entry: _Entry, due: float) -> None:
        with self._cond:
            entry.due, entry.busy = due, False
            if entry.id in self._entries:
                heapq.heappush(self._heap, (due, entry.id))
            self._cond.notify()

    def _forget(self, entry: _Entry) -> None:
        with self._cond:
            if self._entries.pop(entry.id, None) is not None:
                self._bytes -= entry.size

    def _attempt(self, entry: _Entry) -> None:
        """One retry of one message: the steps it still owes, then its new state."""
        eml, path = self._paths(entry.id)
        try:
            state = _read_state(path)
            with open(eml, "rb") as f:
                job = _job(state, f.read())
        except FileNotFoundError:
            self._forget(entry)  # -delete moved it away
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("unreadable queue file moved to corrupt/", extra=fields(id=entry.id, error=str(exc)))
            move(self.settings, entry.id, CORRUPT)
            self._forget(entry)
            return
        message = job.message
        attempts = int(state["attempts"]) + 1
        results: List[str] = []
        failure = self.delivery.run_steps(job, results, keep_going=True)
        log.info("retry", extra=fields(id=entry.id, attempt=attempts,
                                       result=str(outcome.client_reply(failure)) if failure else "ok",
                                       remote="; ".join(results)))
        created = float(state["created"])
        pending = job.pending()
        if pending and time.time() - created >= self.settings.queue_lifetime:
            # One line as the bounce quotes it, whatever the last error held.
            reason = "%d %s %s" % replies.expired(job.error or "none")
            for pair in pending:
                pair.state, pair.reply = REFUSED, reason
            log.warning("expired", extra=fields(id=entry.id, attempts=attempts, reason=job.error))
        fresh = [p for p in job.pairs if p.state == REFUSED and not p.notified]
        for pair in fresh:
            pair.notified = True
        if not os.path.exists(eml):
            self._forget(entry)  # -delete moved it away during the attempt
            return
        if job.message is not message:
            # The webhook replaced it: what stays queued, or goes to failed/, is what it gave.
            files.atomic_write(eml, job.message)
        if job.pending():
            due = min(time.time() + self._delay(attempts, failure), created + self.settings.queue_lifetime)
            encoded = _encode(_state(job, created, attempts, due))
            files.atomic_write(path, encoded)
            sync_folder(self.queue_dir)
            self._bounce(job, fresh)
            with self._cond:
                self._bytes += len(job.message) + len(encoded) - entry.size
                entry.size = len(job.message) + len(encoded)
            self._reschedule(entry, due)
            return
        if any(p.state == REFUSED for p in job.pairs):
            files.atomic_write(path, _encode(_state(job, created, attempts, 0)))
            move(self.settings, entry.id, FAILED)
            self._forget(entry)  # first: the bounce may need the room it held
            self._bounce(job, fresh)
        else:
            for leftover in (path, eml):  # the state first: a body alone is removed at start-up
                _unlink(leftover)
            log.info("delivered", extra=fields(id=entry.id, attempts=attempts))
            self._forget(entry)

    # ---- bounces -------------------------------------------------------------

    def _bounce(self, job: Job, pairs: List[Pair]) -> None:
        """A DSN to the sender for `pairs`, queued as a new message with the null sender."""
        env, s = job.env, self.settings
        if not pairs:
            return
        reason = "; ".join("%s: %s" % (p.rcpt, p.reply) for p in pairs)
        if not env.mail_from or not s.bounce:
            log.warning("refused for good, no bounce", extra=fields(
                id=env.id, reason=reason, why="null sender" if not env.mail_from else "bounce off"))
            return
        body = dsn.build(s.hostname, env.mail_from, env.id, env.received_at,
                         [(p.rcpt, p.reply) for p in pairs], job.message)
        bounce = Envelope(id=new_message_id(), peer="127.0.0.1", helo=s.hostname, user=None,
                          tls=None, esmtp=True, mail_from="", rcpts=[env.mail_from], size=len(body))
        plan = routing.route(s.remotes, "", bounce.rcpts, s.strict_sender)
        if not plan and s.remotes:
            log.warning("no remote routes the bounce", extra=fields(id=env.id, to=env.mail_from,
                                                                     reason=reason))
            return
        # Our own report: not scanned; it goes to the command and the remotes like any message.
        if self._store(self.delivery.new_job(bounce, body, plan, scan=False), 0, time.time(), "bounce"):
            log.warning("bounced", extra=fields(id=env.id, bounce=bounce.id, to=env.mail_from,
                                                reason=reason))


# -- the command line: -queue, -flush, -delete ----------------------------------

def _need_spool(settings: Settings) -> None:
    if not settings.spool_dir:
        raise ConfigError("spool_dir", "not set, so there is no queue")


def list_queue(settings: Settings) -> List[str]:
    """-queue: one line per queued message and a total, read from the files alone.

    Raises:
        ConfigError: spool_dir is not set.
    """
    _need_spool(settings)
    folder = _folder(settings, QUEUE)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    lines, count, total, now = [], 0, 0, time.time()
    for name in names:
        if not name.endswith(".json") or name.startswith(files.TEMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        try:
            state = _read_state(path)
            size = os.path.getsize(path) + os.path.getsize(path[:-len(".json")] + ".eml")
            pending = [p["rcpt"] + "->" + p["dest"] for p in state["pairs"] if p["state"] == PENDING]
            due = float(state["next_attempt"])
            lines.append("%s age=%s size=%d from=<%s> pending=%s attempts=%d next=%s error=%s" % (
                state["id"], _age(now - float(state["created"])), size, state["envelope"]["from"],
                ",".join(pending), state["attempts"],
                "now" if due <= now else "in " + _age(due - now), state["last_error"] or "-"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            lines.append("%s unreadable: %s" % (name[:-len(".json")], exc))
            continue
        count += 1
        total += size
    lines.append("%d message%s queued, %d bytes" % (count, "" if count == 1 else "s", total))
    return lines


def _age(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)


def request_flush(settings: Settings) -> str:
    """-flush: ask the running relay to retry everything now (it looks every second)."""
    _need_spool(settings)
    with open(_folder(settings, FLUSH_FILE), "w", encoding="ascii") as f:
        f.write("%s\n" % datetime.now(timezone.utc).isoformat())
    return "flush requested: the running relay retries every queued message within a second"


def delete(settings: Settings, target: str) -> Tuple[int, str]:
    """-delete ID|ALL: move messages to failed/ without a bounce; (exit status, text)."""
    _need_spool(settings)
    folder, failed = _folder(settings, QUEUE), _folder(settings, FAILED)
    if target == "ALL":
        ids = sorted(n[:-len(".json")] for n in os.listdir(folder)
                     if n.endswith(".json") and not n.startswith(files.TEMP_PREFIX))
    elif os.path.exists(os.path.join(folder, target + ".json")) and os.path.basename(target) == target:
        ids = [target]
    else:
        return 1, "no queued message %s" % target
    os.makedirs(failed, exist_ok=True)
    for message_id in ids:
        move(settings, message_id, FAILED)
    return 0, "moved %d message%s to %s" % (len(ids), "" if len(ids) == 1 else "s", failed)
