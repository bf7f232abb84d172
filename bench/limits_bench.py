"""The remote-limits row (SPEC 13), driven by bench/run.py (`--only 7`).

20 clients (Python threads with smtplib, started together) each send 5 1 KB
messages on one connection of their own through the relay, without a spool,
into the simulated upstream of tests/upstream_sim.py: at most 3 connections
(a fourth gets `432 4.3.2` at MAIL, as Microsoft 365 answers), each message
held 50 ms before its 250, so the upstream itself takes at most
3 / 0.05 s = 60 msgs/s. Two variants: the remote URL with `?connections=3`
(the relay keeps within the limit) and without it (the relay learns it from
the 432s: throttle feedback). A variant the relay's config refuses is
reported as not supported; `remote_wait = 30s` is given when the relay knows
the option. Fails only when a message the relay answered 250 never reached
the upstream.
"""

import collections
import importlib.util
import os
import smtplib
import subprocess
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from run import HOST, RECIPIENT, ROOT, SENDER, BenchError, Relay

CLIENTS = 20
PER_CLIENT = 5
UPSTREAM_CONNECTIONS = 3
HOLD = 0.05  # seconds the upstream holds each message before its 250
UPSTREAM_LIMIT = UPSTREAM_CONNECTIONS / HOLD  # msgs/s the upstream can take at best
REMOTE_WAIT = "30s"
CLIENT_TIMEOUT = 40.0  # seconds; above remote_wait, so a client sees the relay's answer
SIZE = 1024
GOAL_SHARE = 0.9  # of UPSTREAM_LIMIT
VARIANTS = (("connections=3", "connections=%d" % UPSTREAM_CONNECTIONS), ("throttle feedback", ""))


def _load_simulator():
    """tests/upstream_sim.py, imported by path (tests/ is not a package)."""
    path = os.path.join(ROOT, "tests", "upstream_sim.py")
    spec = importlib.util.spec_from_file_location("upstream_sim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LimitsResult(NamedTuple):
    variant: str
    supported: bool
    note: str  # why not supported, or which option was left out
    clients_ok: int  # clients whose PER_CLIENT messages all got 250
    replies: Dict[str, int]  # first three characters of each reply the clients got ("closed": none)
    refusals: Dict[str, int]  # upstream limit refusals by reply code
    delivered: int  # messages the upstream accepted
    duplicates: int  # of those, copies of a message it already had
    max_seen: int  # peak simultaneous connections at the upstream
    elapsed: float  # seconds from the start until the last client finished


def _check(workdir: str, options: Dict[str, str]) -> Tuple[int, str]:
    """Run `relay.py -check` on an ini of these options: (exit status, last line of stderr)."""
    ini = os.path.join(workdir, "check.ini")
    with open(ini, "w") as f:
        f.write("".join("%s = %s\n" % item for item in options.items()))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "relay.py"), "-check", ini], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return result.returncode, lines[-1] if lines else ""


def _accepted_options(workdir: str, options: Dict[str, str]) -> Tuple[Optional[Dict[str, str]], str]:
    """The options the relay takes, and a note. remote_wait is dropped when the
    relay does not know it; None when it refuses the remote URL (its reason).

    Raises:
        BenchError: -check failed for another reason.
    """
    options = dict(options)
    note = ""
    while True:
        status, error = _check(workdir, dict(options, listen="%s:0" % HOST))
        if status == 0:
            return options, note
        # cli.main prints a config error as "smtprelay: config: <option>: <reason>", exit 2.
        if status == 2 and "config: remote_wait:" in error and "remote_wait" in options:
            del options["remote_wait"]
            note = "remote_wait not supported, left out"
            continue
        if status == 2 and "config: remotes:" in error:
            return None, error.split("config: ", 1)[1]
        raise BenchError("relay -check failed (exit %d): %s" % (status, error))


def _message(client: int, number: int) -> bytes:
    body = ("x" * 63 + "\r\n") * (SIZE // 65)
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: limits %d-%d\r\n\r\n%s" % (
        SENDER, RECIPIENT, client, number, body)).encode()


def _reply_code(exc: smtplib.SMTPException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return str(next(iter(exc.recipients.values()))[0])
    return str(getattr(exc, "smtp_code", "error"))


def _client(port: int, client: int, start: threading.Barrier, replies: List[List[str]]) -> None:
    """Send PER_CLIENT messages on one connection; record each reply's code."""
    codes: List[str] = []
    replies[client] = codes
    start.wait()
    try:
        with smtplib.SMTP(HOST, port, local_hostname="client%d.bench" % client, timeout=CLIENT_TIMEOUT) as smtp:
            for number in range(PER_CLIENT):
                try:
                    smtp.sendmail(SENDER, [RECIPIENT], _message(client, number))
                    codes.append("250")
                except smtplib.SMTPServerDisconnected:
                    raise
                except smtplib.SMTPException as exc:  # a refusal of this message; the session goes on
                    codes.append(_reply_code(exc))
    except (OSError, smtplib.SMTPException):
        pass  # the connection is gone: the messages not sent count as "closed"
    codes.extend(["closed"] * (PER_CLIENT - len(codes)))


def _subject(data: bytes) -> bytes:
    for line in data.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line
        if not line:
            break
    return b""


def bench_variant(sim_module, workdir: str, name: str, query: str, extra: Dict[str, str]) -> LimitsResult:
    folder = os.path.join(workdir, "limits-%s" % name.replace(" ", "-").replace("=", ""))
    os.makedirs(folder, exist_ok=True)
    sim = sim_module.UpstreamSim(max_connections=UPSTREAM_CONNECTIONS, refuse_at="mail", hold=HOLD,
                                 timeout=60.0).start()
    relay = None
    try:
        wanted = dict(extra, remotes=sim.url(query), remote_wait=REMOTE_WAIT)
        options, note = _accepted_options(folder, wanted)
        if options is None:
            return LimitsResult(name, False, note, 0, {}, {}, 0, 0, 0, 0.0)
        relay = Relay(folder, sim.port, 100, options)
        replies: List[List[str]] = [[] for _ in range(CLIENTS)]
        start = threading.Barrier(CLIENTS + 1)
        threads = [threading.Thread(target=_client, args=(relay.port, n, start, replies), daemon=True)
                   for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.monotonic()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT * PER_CLIENT)
        elapsed = time.monotonic() - started
        relay.check_alive()
        ok = {_subject(_message(client, number)) for client, codes in enumerate(replies)
              for number, code in enumerate(codes) if code == "250"}
        upstream = [_subject(data) for _, _, data in sim.messages]
        lost = ok - set(upstream)
        if lost:
            raise BenchError("limits, %s: %d messages answered 250 never reached the upstream" % (name, len(lost)))
        return LimitsResult(
            name, True, note,
            sum(codes == ["250"] * PER_CLIENT for codes in replies),
            dict(collections.Counter(code for codes in replies for code in codes)),
            dict(collections.Counter(reply[:3] for _, reply in sim.refusals)),
            len(upstream), len(upstream) - len(set(upstream)), sim.max_seen, elapsed)
    finally:
        if relay:
            relay.close()
        sim.stop()


def bench_limits(workdir: str, extra: Dict[str, str]) -> List[LimitsResult]:
    sim_module = _load_simulator()
    results = []
    for name, query in VARIANTS:
        results.append(bench_variant(sim_module, workdir, name, query, extra))
        r = results[-1]
        if r.supported:
            print("  %s: %d of %d clients got 250 for all %d messages, %d upstream refusals, %d delivered in %.1f s" % (
                name, r.clients_ok, CLIENTS, PER_CLIENT, sum(r.refusals.values()), r.delivered, r.elapsed),
                flush=True)
        else:
            print("  %s: not supported by this relay (%s)" % (name, r.note), flush=True)
    return results


def _counts(counts: Dict[str, int]) -> str:
    return ", ".join("%s x%d" % item for item in sorted(counts.items())) or "none"


def print_rows(results: Optional[List[LimitsResult]]) -> None:
    if not results:
        return
    print()
    print("Remote limits (%d clients x %d messages, one connection each, into a %d-connection upstream that "
          "holds each message %.0f ms: at most %.0f msgs/s; no spool):" % (
              CLIENTS, PER_CLIENT, UPSTREAM_CONNECTIONS, HOLD * 1000, UPSTREAM_LIMIT))
    print("| variant | clients with 5 x 250 | replies to clients | upstream refusals | delivered "
          "| upstream peak connections | msgs/s | share of %.0f msgs/s | elapsed | goals |" % UPSTREAM_LIMIT)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not r.supported:
            print("| %s | not supported by this relay: %s | | | | | | | | |" % (r.variant, r.note))
            continue
        rate = r.delivered / r.elapsed if r.elapsed else 0.0
        share = rate / UPSTREAM_LIMIT
        goals = ["250s %s" % ("ok" if r.clients_ok == CLIENTS else "below"),
                 "throughput %s" % ("ok" if share >= GOAL_SHARE else "below")]
        if r.variant.startswith("connections="):
            goals.insert(1, "refusals %s" % ("ok" if not r.refusals else "below"))
        delivered = "%d" % r.delivered + (" (%d duplicates)" % r.duplicates if r.duplicates else "")
        print("| %s | %d of %d (%.0f %%) | %s | %s | %s | %d | %.1f | %.2f | %.1f s | %s |" % (
            r.variant + (" (%s)" % r.note if r.note else ""), r.clients_ok, CLIENTS, 100.0 * r.clients_ok / CLIENTS,
            _counts(r.replies), _counts(r.refusals), delivered, r.max_seen, rate, share, r.elapsed,
            ", ".join(goals)))
