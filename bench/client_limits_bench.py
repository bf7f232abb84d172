"""The client-limits row (SPEC 14), driven by bench/run.py (`--only 8`).

10 normal clients, each from its own loopback address (127.0.0.10 to
127.0.0.19), send NORMAL messages one after another with THINK seconds
between them, while one flooding client on 127.0.0.1 sends as fast as it
can on FLOODERS connections, all through the relay into the simulated
upstream of tests/upstream_sim.py (no limits there). Three variants: no
flood, the flood with `client_message_rate`, the flood without it. The row
reports the normal clients' msgs/s in each, as a share of the no-flood
figure (goal: at least 0.9 with the limit), and what the flood got.
"""

import importlib.util
import os
import smtplib
import threading
import time
from typing import List, NamedTuple, Optional

from run import HOST, RECIPIENT, ROOT, SENDER, Relay

NORMAL_CLIENTS = 10
NORMAL = 15  # messages each normal client sends
THINK = 0.1  # seconds a normal client waits between two messages
FLOODERS = 4  # connections of the flooding client
RATE = "200/m"  # client_message_rate: a normal client sends under 600/m; the flood far more
GOAL_SHARE = 0.9
MESSAGE = ("From: <%s>\r\nTo: <%s>\r\nSubject: fair\r\n\r\n%s" % (SENDER, RECIPIENT, "x" * 1000)).encode()
VARIANTS = (("no flood", False, True), ("flood, client_message_rate=%s" % RATE, True, True),
            ("flood, no client limit", True, False))


class ClientResult(NamedTuple):
    variant: str
    normal_rate: float  # msgs/s of one normal client, mean over them
    normal_refused: int  # normal messages not answered 250
    flood_ok: int  # flood messages answered 250
    flood_refused: int  # flood messages answered 450 (or another refusal)


def _simulator():
    spec = importlib.util.spec_from_file_location("upstream_sim", os.path.join(ROOT, "tests", "upstream_sim.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal(port: int, number: int, rates: List[float], refused: List[int]) -> None:
    source = "127.0.0.%d" % (10 + number)
    sent = bad = 0
    started = time.monotonic()
    with smtplib.SMTP(HOST, port, timeout=60, source_address=(source, 0)) as smtp:
        for _ in range(NORMAL):
            try:
                smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                sent += 1
            except smtplib.SMTPException:
                bad += 1
            time.sleep(THINK)
    rates[number] = sent / (time.monotonic() - started)
    refused[number] = bad


def _flood(port: int, stop: threading.Event, counts: List[int]) -> None:
    """As fast as it can: a refused MAIL is retried at once, and a session the
    relay closes (its error budget spent) is opened again, as a looping device does."""
    while not stop.is_set():
        try:
            with smtplib.SMTP(HOST, port, timeout=60) as smtp:
                while not stop.is_set():
                    try:
                        smtp.sendmail(SENDER, [RECIPIENT], MESSAGE)
                        counts[0] += 1
                    except smtplib.SMTPResponseException as exc:
                        counts[1] += 1
                        if exc.smtp_code == 421:
                            break
                        smtp.rset()
        except (OSError, smtplib.SMTPException):
            continue  # closed by the relay: connect again


def bench_variant(sim_module, workdir: str, name: str, flood: bool, limited: bool, extra) -> ClientResult:
    folder = os.path.join(workdir, "clients-%d" % (hash(name) & 0xFFFF))
    os.makedirs(folder, exist_ok=True)
    sim = sim_module.UpstreamSim(timeout=60.0).start()
    options = dict(extra)
    if limited:
        options["client_message_rate"] = RATE
    relay = Relay(folder, sim.port, 200, options)
    try:
        stop = threading.Event()
        counts = [[0, 0] for _ in range(FLOODERS)]
        flooders = [threading.Thread(target=_flood, args=(relay.port, stop, c), daemon=True)
                    for c in counts] if flood else []
        for thread in flooders:
            thread.start()
        if flood:
            time.sleep(1.0)  # the flood is under way (and past its burst) before the others start
        rates, refused = [0.0] * NORMAL_CLIENTS, [0] * NORMAL_CLIENTS
        normals = [threading.Thread(target=_normal, args=(relay.port, n, rates, refused))
                   for n in range(NORMAL_CLIENTS)]
        for thread in normals:
            thread.start()
        for thread in normals:
            thread.join(120)
        stop.set()
        for thread in flooders:
            thread.join(60)
        relay.check_alive()
        return ClientResult(name, sum(rates) / len(rates), sum(refused),
                            sum(c[0] for c in counts), sum(c[1] for c in counts))
    finally:
        relay.close()
        sim.stop()


def bench_clients(workdir: str, extra) -> List[ClientResult]:
    sim_module = _simulator()
    results = []
    for name, flood, limited in VARIANTS:
        results.append(bench_variant(sim_module, workdir, name, flood, limited, extra))
        r = results[-1]
        print("  %s: normal clients %.2f msgs/s each, %d refused; flood %d accepted, %d refused" % (
            name, r.normal_rate, r.normal_refused, r.flood_ok, r.flood_refused), flush=True)
    return results


def print_rows(results: Optional[List[ClientResult]]) -> None:
    if not results:
        return
    base = results[0].normal_rate
    print()
    print("Client limits (%d normal clients, %d messages each with %.0f ms between, beside one client flooding "
          "on %d connections):" % (NORMAL_CLIENTS, NORMAL, THINK * 1000, FLOODERS, ))
    print("| variant | normal msgs/s each | share of no flood | normal refused | flood accepted | flood refused | goal |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        share = r.normal_rate / base if base else 0.0
        goal = ""
        if "client_message_rate" in r.variant:
            goal = "ok" if share >= GOAL_SHARE and not r.normal_refused else "below"
        print("| %s | %.2f | %.2f | %d | %d | %d | %s |" % (
            r.variant, r.normal_rate, share, r.normal_refused, r.flood_ok, r.flood_refused, goal))
