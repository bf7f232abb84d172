"""The spool's two benchmark rows (SPEC 9), driven by bench/run.py.

4. The load of configuration 1 (1 KB, one message per connection, 20
   clients) through a relay with `spool_mode = always`, next to the same
   load through a relay without a spool and straight to the sink, in the same
   round. The always-mode rate is the rate at which the relay answers 250
   (each message fsynced first); the sink must then receive every message.
5. The outage: 5,000 messages (the same load) with `spool_mode = fallback`
   while the sink is down for the first 10 seconds; reports how long the
   queue takes to drain once the sink is back. Fails on any lost or
   duplicated message.
"""

import os
import statistics
import subprocess
import time
from typing import Dict, List, NamedTuple

from run import CONFIGS, HOST, RECIPIENT, SENDER, BenchError, Relay, Sink, find_tool, free_port, measure, scaled

OUTAGE = 10.0  # seconds the sink is down at the start of the outage run (scaled by --scale)
OUTAGE_MESSAGES = 5000
DRAIN_LIMIT = 600.0  # seconds the queue may take to drain before the run fails
SPOOL_OPTIONS = {"queue_retry_min": "1s", "queue_retry_max": "5s"}


class AlwaysResult(NamedTuple):
    direct: float
    plain: float  # msgs/s through the relay without a spool
    always: float  # msgs/s answered by the relay with spool_mode = always
    drain: float  # seconds after the load until the sink had every always-mode message


class OutageResult(NamedTuple):
    outage: float  # seconds the sink was down
    messages: int
    queued: int  # messages still queued when the sink came back
    load: float  # seconds the clients took
    drain: float  # seconds from the sink's return until the queue was empty and all arrived
    received: int


def _queued(spool_dir: str) -> int:
    folder = os.path.join(spool_dir, "queue")
    return sum(name.endswith(".json") for name in os.listdir(folder)) if os.path.isdir(folder) else 0


def _drained(sink: Sink, spool_dir: str, expected: int) -> float:
    """Wait until the queue is empty and the sink holds `expected`; returns when, or fails."""
    deadline = time.monotonic() + DRAIN_LIMIT
    while _queued(spool_dir) or sink.count() < expected:
        if time.monotonic() > deadline:
            raise BenchError("the queue did not drain in %.0fs: %d queued, sink has %d of %d" % (
                DRAIN_LIMIT, _queued(spool_dir), sink.count(), expected))
        time.sleep(0.1)
    return time.monotonic()


def _check_exact(sink: Sink, expected: int, what: str) -> int:
    """After a drain: the count must stay at `expected` (a late duplicate fails too)."""
    received = sink.wait_count(expected + 1, timeout=2.0)
    if received != expected:
        raise BenchError("%s: the sink received %d of %d messages" % (what, received, expected))
    return received


def bench_always(sink: Sink, workdir: str, runs: int, scale: float, extra: Dict[str, str]) -> AlwaysResult:
    cfg = scaled(CONFIGS[0], scale)
    plain_dir, always_dir = os.path.join(workdir, "plain"), os.path.join(workdir, "always")
    spool_dir = os.path.join(always_dir, "spool")
    for folder in (plain_dir, always_dir):
        os.makedirs(folder, exist_ok=True)
    options = dict(extra, spool_dir=spool_dir, spool_mode="always", **SPOOL_OPTIONS)
    plain = Relay(plain_dir, sink.port, max(100, cfg.clients * 5), extra)
    always = Relay(always_dir, sink.port, max(100, cfg.clients * 5), options)
    try:
        rows: List[AlwaysResult] = []
        for n in range(1, runs + 1):
            direct = measure(sink, sink.port, cfg, "direct")
            through = measure(sink, plain.port, cfg, "through the relay")
            before = sink.count()
            started = time.monotonic()
            _drive(always.port, cfg.messages)
            answered = time.monotonic()
            rate = cfg.messages / (answered - started)
            done = _drained(sink, spool_dir, before + cfg.messages)
            _check_exact(sink, before + cfg.messages, "spool_mode always")
            always.check_alive()
            rows.append(AlwaysResult(direct, through, rate, done - answered))
            print("  round %d: direct %8.0f   no spool %7.0f (%.3f)   always %7.0f msgs/s (%.3f)" % (
                n, direct, through, through / direct, rate, rate / direct), flush=True)
        return AlwaysResult(*(statistics.median(column) for column in zip(*rows)))
    finally:
        plain.close()
        always.close()


def _source(port: int, messages: int) -> List[str]:
    """smtp-source: `messages` 1 KB messages, one per connection, 20 clients."""
    cfg = CONFIGS[0]
    return [find_tool("smtp-source"), "-s", str(cfg.clients), "-l", str(cfg.size), "-f", SENDER,
            "-t", RECIPIENT, "-M", "client.bench", "-m", str(messages), "%s:%d" % (HOST, port)]


def _finished(returncode: int, output: bytes) -> None:
    if returncode != 0:
        raise BenchError("smtp-source failed (exit %d): %s" % (
            returncode, output.decode("utf-8", "replace").strip()[-500:]))


def _drive(port: int, messages: int) -> None:
    result = subprocess.run(_source(port, messages), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _finished(result.returncode, result.stdout)


def bench_outage(workdir: str, scale: float, extra: Dict[str, str]) -> OutageResult:
    messages = max(20, round(OUTAGE_MESSAGES * scale / 20) * 20)
    outage = max(1.0, OUTAGE * min(scale, 1.0))
    folder = os.path.join(workdir, "outage")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)  # smtp-sink drops to nobody
    spool_dir = os.path.join(folder, "spool")
    port = free_port()
    relay = Relay(folder, port, 200, dict(extra, spool_dir=spool_dir, spool_mode="fallback", **SPOOL_OPTIONS))
    sink = None
    try:
        started = time.monotonic()
        load = subprocess.Popen(_source(relay.port, messages), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(max(0.0, started + outage - time.monotonic()))  # the outage itself
        queued = _queued(spool_dir)
        sink = Sink(folder, port)
        back = time.monotonic()
        output, _ = load.communicate()
        loaded = time.monotonic() - started
        _finished(load.returncode, output)
        done = _drained(sink, spool_dir, messages)
        received = _check_exact(sink, messages, "outage")
        relay.check_alive()
        return OutageResult(outage, messages, queued, loaded, done - back, received)
    finally:
        relay.close()
        if sink:
            sink.close()


def print_rows(always, outage) -> None:
    if always:
        print()
        print("Spool, spool_mode = always (%s; msgs/s answered, each on disk first):" % CONFIGS[0].name)
        print("| direct msgs/s | no spool msgs/s | ratio | always msgs/s | ratio | always / no spool "
              "| target (min / aim, of no spool) | drain after the load |")
        print("|---|---|---|---|---|---|---|---|")
        share = always.always / always.plain
        print("| %.0f | %.0f | %.3f | %.0f | %.3f | %.2f | 0.50 / 0.80 (%s) | %.1f s |" % (
            always.direct, always.plain, always.plain / always.direct, always.always,
            always.always / always.direct, share, "ok" if share >= 0.5 else "below", always.drain))
    if outage:
        print()
        print("Spool outage (fallback; sink down for the first %.0f s): %d messages, %d queued when the "
              "sink came back, load took %.1f s, queue drained %.1f s after the sink returned, "
              "sink received %d (no loss, no duplicate)" % (
                  outage.outage, outage.messages, outage.queued, outage.load, outage.drain, outage.received))
