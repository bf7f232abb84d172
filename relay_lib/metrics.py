"""The relay's counters, gauges and histograms, and their Prometheus text
exposition, format 0.0.4 (SPEC 12).

Owns every metric of the relay, as module-level objects that live as long as
the process, so a counter never resets. Must not do I/O or serve HTTP: other
modules only count, and `metrics_http` serves `REGISTRY.render()`.

Counting: a unit increment is `next()` on an `itertools.count`, one C call
that the GIL makes atomic, so the hot path takes no lock and loses nothing.
Adding an amount (bytes) or observing a histogram takes a small lock: that
happens once per message or remote transaction, beside milliseconds of I/O.
"""

import bisect
import itertools
import math
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from relay_lib.logs import log

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Seconds: a loopback sink answers in milliseconds, remote_timeout is 60s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _count_value(count: "itertools.count") -> int:
    # itertools.count has no read method; its repr, `count(N)`, is its state.
    return int(repr(count)[6:-1])


class Tally:
    """A number that only rises: inc() takes no lock, add(n) a small one."""

    __slots__ = ("inc", "_count", "_added", "_lock")

    def __init__(self):
        self._count = itertools.count()
        self.inc = self._count.__next__
        self._added = 0
        self._lock = threading.Lock()

    def add(self, amount: int) -> None:
        with self._lock:
            self._added += amount

    def value(self) -> int:
        return _count_value(self._count) + self._added


class Level:
    """A number that goes up and down (inc/dec), counted without a lock."""

    __slots__ = ("inc", "dec", "_ups", "_downs")

    def __init__(self):
        self._ups, self._downs = itertools.count(), itertools.count()
        self.inc, self.dec = self._ups.__next__, self._downs.__next__

    def value(self) -> int:
        downs = _count_value(self._downs)  # read first: a dec never comes before its inc
        return _count_value(self._ups) - downs


class Setting:
    """A number that is set, not counted (a limit): one attribute write."""

    __slots__ = ("_value",)

    def __init__(self):
        self._value = 0

    def set(self, value: int) -> None:
        self._value = value

    def value(self) -> int:
        return self._value


class Spread:
    """Observations in cumulative buckets, with their sum and count."""

    __slots__ = ("_bounds", "_counts", "_sum", "_lock")

    def __init__(self, bounds: Sequence[float]):
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        slot = bisect.bisect_left(self._bounds, value)  # the first bound >= value ("le")
        with self._lock:
            self._counts[slot] += 1
            self._sum += value

    def snapshot(self) -> Tuple[Tuple[float, ...], List[int], float]:
        """(bounds, cumulative counts for each bound and then +Inf, sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        return self._bounds, list(itertools.accumulate(counts)), total


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (n, _escape_label(v)) for n, v in zip(names, values))


class Family:
    """One metric name with its HELP, TYPE and one child per label values."""

    def __init__(self, registry: "Registry", kind: str, name: str, help_text: str,
                 labelnames: Sequence[str], new_child: Callable):
        assert _NAME.match(name) and all(_LABEL.match(n) and n != "le" for n in labelnames), name
        self.kind, self.name, self.help = kind, name, help_text
        self.labelnames = tuple(labelnames)
        self._new_child = new_child
        self._children: Dict[Tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        registry.add(self)

    def labels(self, *values: str):
        """The child for these label values (created at first use, then kept)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames) or not all(isinstance(v, str) for v in values):
                raise ValueError("%s takes labels %s" % (self.name, self.labelnames))
            with self._lock:
                child = self._children.setdefault(values, self._new_child())
        return child

    def render(self, out: List[str]) -> None:
        out.append("# HELP %s %s" % (self.name, _escape_help(self.help)))
        out.append("# TYPE %s %s" % (self.name, self.kind))
        with self._lock:  # a child may be added meanwhile
            children = sorted(self._children.items())
        for values, child in children:
            if self.kind == "histogram":
                bounds, counts, total = child.snapshot()
                for bound, count in zip([_number(float(b)) for b in bounds] + ["+Inf"], counts):
                    out.append("%s_bucket%s %d" % (self.name, _labels(
                        self.labelnames + ("le",), values + (bound,)), count))
                out.append("%s_sum%s %s" % (self.name, _labels(self.labelnames, values), _number(total)))
                out.append("%s_count%s %d" % (self.name, _labels(self.labelnames, values), counts[-1]))
            else:
                out.append("%s%s %s" % (self.name, _labels(self.labelnames, values), _number(child.value())))


class QueueGauges:
    """The spool's gauges, read at each scrape from the callback it registers."""

    NAMES = (("smtprelay_queue_messages", "Messages waiting in the spool."),
             ("smtprelay_queue_bytes", "Bytes of the messages waiting in the spool."),
             ("smtprelay_queue_oldest_age_seconds", "Age of the oldest message in the spool."))

    def __init__(self, registry: "Registry"):
        self.source: Optional[Callable[[], Tuple[int, int, float]]] = None
        registry.add(self)

    def render(self, out: List[str]) -> None:
        values: Sequence[float] = (0, 0, 0)
        source = self.source
        if source is not None:
            try:
                values = source()
            # A broken callback must not take /metrics down with it.
            except Exception:  # noqa: BLE001
                log.exception("queue metrics failed")
                return
        for (name, help_text), value in zip(self.NAMES, values):
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s gauge" % name)
            out.append("%s %s" % (name, _number(value)))


class Registry:
    """The metric families, rendered in the order they were made."""

    def __init__(self):
        self._families: list = []

    def add(self, family) -> None:
        self._families.append(family)

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Family:
        return Family(self, "counter", name, help_text, labelnames, Tally)

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Family:
        return Family(self, "gauge", name, help_text, labelnames, Level)

    def setting(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Family:
        return Family(self, "gauge", name, help_text, labelnames, Setting)

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str],
                  buckets: Sequence[float]) -> Family:
        return Family(self, "histogram", name, help_text, labelnames, lambda: Spread(buckets))

    def render(self) -> str:
        """Every metric in the text exposition format 0.0.4."""
        out: List[str] = []
        for family in self._families:
            family.render(out)
        return "\n".join(out) + "\n"


REGISTRY = Registry()

SESSIONS_OPEN = REGISTRY.gauge(
    "smtprelay_sessions_open", "Connections holding a session slot now, by listener.", ("listener",))
SESSIONS = REGISTRY.counter(
    "smtprelay_sessions_total", "Connections admitted (past allowed_nets and max_connections), by listener.",
    ("listener",))
CONNECTIONS_REFUSED = REGISTRY.counter(
    "smtprelay_connections_refused_total", "Connections refused or dropped before SMTP, by reason.",
    ("reason",))
MESSAGES = REGISTRY.counter(
    "smtprelay_messages_total", "Messages received to their final dot, by the result given to the client.",
    ("result",))
RECEIVED_BYTES = REGISTRY.counter(
    "smtprelay_received_bytes_total", "Octets of message data received after DATA.").labels()
REMOTE_DELIVERIES = REGISTRY.counter(
    "smtprelay_remote_deliveries_total", "Transactions with each SMTP remote (host:port), by outcome.",
    ("remote", "outcome"))
REMOTE_SECONDS = REGISTRY.histogram(
    "smtprelay_remote_delivery_seconds", "Time of each transaction with an SMTP remote, connecting included.",
    ("remote",), LATENCY_BUCKETS)
# Remote limits (SPEC 13), by account: the masked URL of its first remote.
REMOTE_CONNECTIONS_OPEN = REGISTRY.gauge(
    "smtprelay_remote_connections_open", "Connections open to each remote account now, idle ones included.",
    ("remote",))
REMOTE_WAITING = REGISTRY.gauge(
    "smtprelay_remote_waiting", "Messages waiting for room at each remote account now.", ("remote",))
REMOTE_CONNECTION_LIMIT = REGISTRY.setting(
    "smtprelay_remote_connection_limit", "Current connection limit of each remote account (learned from "
    "throttle replies).", ("remote",))
REMOTE_THROTTLES = REGISTRY.counter(
    "smtprelay_remote_throttles_total", "Throttle replies (421, 432, 4.3.2, 4.4.5) from each remote account.",
    ("remote",))
REMOTE_QUOTA_PAUSES = REGISTRY.counter(
    "smtprelay_remote_quota_pauses_total", "Pauses after a remote account said its sending quota is spent.",
    ("remote",))
REMOTE_WAIT_SECONDS = REGISTRY.histogram(
    "smtprelay_remote_wait_seconds", "Time messages waited for room at each remote account.",
    ("remote",), LATENCY_BUCKETS)
CLIENT_REFUSALS = REGISTRY.counter(
    "smtprelay_client_limit_refusals_total", "Sessions, MAIL and RCPT refused by a client limit (SPEC 14), by limit.",
    ("limit",))
WEBHOOK_CALLS = REGISTRY.counter(
    "smtprelay_webhook_calls_total", "Webhook calls by verdict (tempfail includes an unreachable scanner).",
    ("outcome",))
OAUTH_FETCHES = REGISTRY.counter(
    "smtprelay_oauth_token_fetches_total", "OAuth token fetches from the token endpoint, by outcome.",
    ("outcome",))
QUEUE = QueueGauges(REGISTRY)

# Series that exist from the start at 0, so a rate() over them needs no first event.
REFUSAL_REASONS = ("not_allowed", "too_many", "shutting_down", "tls_handshake", "proxy_header")
MESSAGE_RESULTS = ("delivered", "queued", "rejected", "tempfailed")
WEBHOOK_OUTCOMES = ("accept", "replace", "reject", "discard", "tempfail")
OAUTH_OUTCOMES = ("ok", "failed")
CLIENT_LIMITS = ("connections", "messages", "recipients")
for _family, _values in ((CONNECTIONS_REFUSED, REFUSAL_REASONS), (MESSAGES, MESSAGE_RESULTS),
                         (WEBHOOK_CALLS, WEBHOOK_OUTCOMES), (OAUTH_FETCHES, OAUTH_OUTCOMES),
                         (CLIENT_REFUSALS, CLIENT_LIMITS)):
    for _value in _values:
        _family.labels(_value)
del _family, _values, _value


def register_queue(source: Optional[Callable[[], Tuple[int, int, float]]]) -> None:
    """Read the queue gauges from `source()` -> (messages, bytes, oldest age in
    seconds) at each scrape; None reports an empty queue again."""
    QUEUE.source = source
