"""Throughput benchmark of SPEC 8: the relay against the limit of this machine.

Starts postfix's smtp-sink on loopback, then for each configuration drives the
same load with postfix's smtp-source twice per round: straight to the sink (the
limit) and through the relay forwarding to that sink. It prints msgs/s for both
and their ratio (median of the rounds), the relay's peak RSS, and then checks
that the relay holds 1,000 idle sessions. Exits 1 when the sink did not receive
exactly the messages that were sent, or when a load run or the idle check fails.

Standard library and bcrypt (for the AUTH rows); run it with the project's virtualenv python
(`make bench`). Linux only: it reads /proc for memory figures.
"""

import argparse
import os
import re
import resource
import select
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional

import auth_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
SENDER = "bench@example.com"
RECIPIENT = "sink@example.org"
IDLE_SESSIONS = 1000
IDLE_HOLD = 3.0  # seconds the idle sessions stay open before they are checked
START_TIMEOUT = 15.0


class Config(NamedTuple):
    """One load of SPEC 8: `messages` in total, `per_conn` on each connection."""

    name: str
    size: int  # payload bytes per message, headers not counted
    per_conn: int
    clients: int
    messages: int  # per run; a multiple of clients * per_conn
    minimum: float  # ratio the relay must reach
    aim: float  # ratio it aims for


CONFIGS = [
    Config("1 KB, 1 msg/conn, 20 clients", 1024, 1, 20, 8000, 0.16, 0.25),
    Config("1 KB, 50 msgs/conn, 20 clients", 1024, 50, 20, 30000, 0.12, 0.20),
    Config("100 KB, 10 msgs/conn, 5 clients", 100 * 1024, 10, 5, 3000, 0.35, 0.60),
]


AUTH_ROWS = len(CONFIGS) + 1  # --only number of the AUTH rows (bench/auth_bench.py)
SPOOL_ROWS = (AUTH_ROWS + 1, AUTH_ROWS + 2)  # --only numbers of the spool rows (bench/spool_bench.py)
LIMITS_ROW = SPOOL_ROWS[1] + 1  # --only number of the remote-limits row (bench/limits_bench.py)
CLIENTS_ROW = LIMITS_ROW + 1  # --only number of the client-limits row (bench/client_limits_bench.py)


class BenchError(Exception):
    """A failure that makes the benchmark result meaningless (lost mail, a dead process)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def find_tool(name: str) -> str:
    # The venv's bin (py-spy) and sbin (smtp-sink, not on a user's PATH) too.
    search = [os.path.dirname(sys.executable), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
    path = shutil.which(name, path=os.pathsep.join(search))
    if not path:
        raise BenchError("%s not found: install postfix (make bench does it)" % name)
    return path


def wait_for_greeting(port: int, proc: subprocess.Popen, log_path: str) -> None:
    """Wait until the server on port answers 220, or fail if proc died."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("process exited with %s:\n%s" % (proc.returncode, tail(log_path)))
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError("no greeting on port %d after %.0fs:\n%s" % (port, START_TIMEOUT, tail(log_path)))


def tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Sink:
    """smtp-sink on a free loopback port, counting every message it accepts.

    With -c the sink rewrites a counter line ("sess=.. quit=.. mesg=N", ended
    by CR) after every message; the last mesg= value in its output is the count.
    """

    def __init__(self, workdir: str, port: Optional[int] = None):
        self.port = port or free_port()
        self.log_path = os.path.join(workdir, "sink.out")
        cmd = [find_tool("smtp-sink"), "-c", "-m", "2048"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        cmd += ["%s:%d" % (HOST, self.port), "1024"]
        self._out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        wait_for_greeting(self.port, self.proc, self.log_path)

    def count(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", tail(self.log_path, 200).encode())
        return int(counts[-1]) if counts else 0

    def wait_count(self, expected: int, timeout: float = 3.0) -> int:
        """The count once it reaches expected, or what it is after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.count()
            if now >= expected or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def close(self) -> None:
        stop(self.proc)
        self._out.close()


class Relay:
    """`python relay.py bench.ini` forwarding to the sink, as a child process."""

    def __init__(self, workdir: str, sink_port: int, max_connections: int, extra: Dict[str, str],
                 profile: Optional[str] = None, cprofile: Optional[str] = None, scheme: str = ""):
        self.port = free_port()
        self.ini = os.path.join(workdir, "bench.ini")
        self.log_path = os.path.join(workdir, "relay.log")
        options = {
            "listen": "%s%s:%d" % (scheme, HOST, self.port),
            "remotes": "smtp://%s:%d" % (HOST, sink_port),
            "hostname": "relay.bench",
            "max_connections": str(max_connections),
            "log_level": "warn",
        }
        options.update(extra)
        with open(self.ini, "w") as f:
            f.write("".join("%s = %s\n" % item for item in options.items()))
        self._out = open(self.log_path, "ab")
        cmd = [sys.executable, os.path.join(ROOT, "relay.py"), self.ini]
        if cprofile:
            cmd[1:2] = [os.path.join(ROOT, "bench", "cprofile_relay.py"), cprofile]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT)
        wait_for_greeting(self.port, self.proc, self.log_path)
        self.profiler = None
        self.profile = profile
        if profile:
            # --gil: only the thread holding the GIL, i.e. where the CPU goes.
            self.profiler = subprocess.Popen(
                [find_tool("py-spy"), "record", "--pid", str(self.proc.pid), "--gil", "--nonblocking",
                 "--rate", "250", "--format", "raw", "--output", profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy needs a moment to attach

    def status(self, key: str) -> Optional[int]:
        """A number from /proc/<pid>/status (VmHWM, VmRSS in kB; Threads)."""
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def cpu_seconds(self) -> float:
        """User + system CPU time the relay has used so far."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError("relay exited with %s:\n%s" % (self.proc.returncode, tail(self.log_path)))

    def close(self) -> None:
        stop(self.proc)
        self._out.close()
        if self.profiler:
            self.profiler.wait(30)  # py-spy writes its output when the relay exits
            print_profile(self.profile)


def print_cprofile(path: str, messages: int, top: int = 30) -> None:
    """The functions with the most own time, with their calls per message."""
    import pstats

    stats = pstats.Stats(path).stats
    total = sum(row[2] for row in stats.values()) or 1.0
    print("  cProfile %s (%d messages through the relay; thread CPU time, inflated by profiling):" % (path, messages))
    print("    own %   calls/msg  us/msg  function")
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    for (filename, line, name), (_, ncalls, tottime, _, _) in rows:
        where = "%s:%d" % (os.path.basename(filename), line) if line else filename
        print("    %5.1f  %9.1f  %6.1f  %s (%s)" % (
            100 * tottime / total, ncalls / messages, 1e6 * tottime / messages, name, where))


def print_profile(path: str, top: int = 25) -> None:
    """Summarise py-spy's raw output ("frame;frame;... count" lines) by function."""
    own: Dict[str, int] = {}
    total: Dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = [re.sub(r" \((.*/)?([^/]+)\)$", r" (\2)", fr) for fr in stack.split(";")]
            n = int(count)
            samples += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                total[frame] = total.get(frame, 0) + n
    print("  profile %s: %d samples with the GIL held" % (path, samples))
    for title, table in (("self", own), ("inclusive", total)):
        print("  top %d by %s time:" % (top, title))
        for frame, n in sorted(table.items(), key=lambda item: -item[1])[:top]:
            print("    %5.1f%%  %s" % (100.0 * n / max(samples, 1), frame))


def drive(port: int, cfg: Config) -> float:
    """Send cfg's load to port with smtp-source; return the elapsed seconds.

    One message per connection is a single smtp-source run. For N per
    connection, smtp-source -d keeps each of its sessions open while its
    shared message counter lasts, so a run of clients * N messages gives
    N messages per connection on average; the load is a sequence of such runs.
    """
    base = [find_tool("smtp-source"), "-s", str(cfg.clients), "-l", str(cfg.size),
            "-f", SENDER, "-t", RECIPIENT, "-M", "client.bench"]
    target = "%s:%d" % (HOST, port)
    if cfg.per_conn == 1:
        runs = [base + ["-m", str(cfg.messages), target]]
    else:
        batch = cfg.clients * cfg.per_conn
        runs = [base + ["-d", "-m", str(batch), target]] * (cfg.messages // batch)
    start = time.perf_counter()
    for cmd in runs:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise BenchError("smtp-source failed (exit %d): %s" % (
                result.returncode, result.stdout.decode("utf-8", "replace").strip()[-500:]))
    return time.perf_counter() - start


def measure(sink: Sink, port: int, cfg: Config, what: str) -> float:
    """Run one load against port, check the sink got all of it; return msgs/s."""
    before = sink.count()
    elapsed = drive(port, cfg)
    received = sink.wait_count(before + cfg.messages) - before
    if received != cfg.messages:
        raise BenchError("%s, %s: the sink received %d of %d messages" % (
            cfg.name, what, received, cfg.messages))
    return cfg.messages / elapsed


def scaled(cfg: Config, scale: float) -> Config:
    batch = cfg.clients * cfg.per_conn
    return cfg._replace(messages=max(1, round(cfg.messages * scale / batch)) * batch)


class Result(NamedTuple):
    cfg: Config
    direct: float  # median msgs/s
    relay: float
    ratio: float  # median of the per-round ratios
    conservative: float  # median relay msgs/s / best direct msgs/s of all rounds
    cpu_ms: float  # relay CPU time (user + system) per message, median
    hwm_kb: Optional[int]


def bench_config(cfg: Config, sink: Sink, workdir: str, runs: int, extra: Dict[str, str],
                 direct_only: bool = False, profile: Optional[str] = None,
                 cprofile: Optional[str] = None) -> Result:
    relay = None
    if not direct_only:
        relay = Relay(workdir, sink.port, max(100, cfg.clients * 5), extra, profile, cprofile)
    try:
        directs, relays, ratios, cpus = [], [], [], []
        for n in range(1, runs + 1):
            direct = measure(sink, sink.port, cfg, "direct")
            through = cpu = 0.0
            if relay:
                cpu_before = relay.cpu_seconds()
                through = measure(sink, relay.port, cfg, "through the relay")
                cpu = (relay.cpu_seconds() - cpu_before) * 1000 / cfg.messages
                relay.check_alive()
            directs.append(direct)
            relays.append(through)
            ratios.append(through / direct)
            cpus.append(cpu)
            print("  round %d: direct %8.0f msgs/s   relay %7.0f msgs/s   ratio %.3f   relay CPU %.2f ms/msg" % (
                n, direct, through, through / direct, cpu), flush=True)
        return Result(cfg, statistics.median(directs), statistics.median(relays),
                      statistics.median(ratios), statistics.median(relays) / max(directs),
                      statistics.median(cpus),
                      relay.status("VmHWM") if relay else None)
    finally:
        if relay:
            relay.close()
            if cprofile and os.path.exists(cprofile):
                print_cprofile(cprofile, cfg.messages * runs)


class IdleResult(NamedTuple):
    held: int
    refused: int
    rss_kb: Optional[int]
    hwm_kb: Optional[int]
    threads: Optional[int]
    delivered: bool  # a message went through while the idle sessions were held


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def bench_idle(sink: Sink, workdir: str, extra: Dict[str, str]) -> IdleResult:
    """Hold IDLE_SESSIONS sessions that only read the greeting (max_connections 1100)."""
    raise_fd_limit(IDLE_SESSIONS * 2 + 256)  # inherited by the relay as well
    relay = Relay(workdir, sink.port, 1100, extra)
    socks: List[socket.socket] = []
    refused = 0
    try:
        for _ in range(IDLE_SESSIONS):
            sock = socket.create_connection((HOST, relay.port), timeout=10)
            socks.append(sock)
            greeting = sock.recv(512)
            if not greeting.startswith(b"220"):
                refused += 1
        time.sleep(IDLE_HOLD)
        # An idle session that is still held has nothing to read: no 421, no EOF.
        poller = select.poll()  # not select(): these descriptors pass FD_SETSIZE
        for sock in socks:
            poller.register(sock, select.POLLIN)
        readable = poller.poll(0)
        before = sink.count()
        delivered = _send_one(relay.port) and sink.wait_count(before + 1) == before + 1
        relay.check_alive()
        return IdleResult(len(socks) - refused - len(readable), refused + len(readable),
                          relay.status("VmRSS"), relay.status("VmHWM"), relay.status("Threads"), delivered)
    finally:
        for sock in socks:
            sock.close()
        relay.close()


def _send_one(port: int) -> bool:
    try:
        with smtplib.SMTP(HOST, port, timeout=30) as client:
            client.sendmail(SENDER, [RECIPIENT], b"Subject: idle check\r\n\r\nhello\r\n")
        return True
    except (OSError, smtplib.SMTPException) as exc:
        print("  idle check: message refused: %s" % exc)
        return False


def mb(kb: Optional[int]) -> str:
    return "n/a" if kb is None else "%.1f MB" % (kb / 1024)


def print_table(results: List[Result], idle: Optional[IdleResult], runs: int) -> None:
    if not results and not idle:
        return
    print()
    print("Results (median of %d rounds; ratio = relay msgs/s / direct msgs/s in the same round)" % runs)
    header = ("| configuration | messages | direct msgs/s | relay msgs/s | ratio | target (min / aim) "
              "| ratio to best direct | relay CPU ms/msg | relay peak RSS |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        verdict = "ok" if r.ratio >= r.cfg.minimum else "below"
        print("| %s | %d | %.0f | %.0f | %.3f | %.2f / %.2f (%s) | %.3f | %.2f | %s |" % (
            r.cfg.name, r.cfg.messages, r.direct, r.relay, r.ratio,
            r.cfg.minimum, r.cfg.aim, verdict, r.conservative, r.cpu_ms, mb(r.hwm_kb)))
    if idle:
        print()
        print("Idle sessions: %d of %d held, %d refused or dropped, a message %s meanwhile; "
              "relay RSS %s (peak %s), %s threads" % (
                  idle.held, IDLE_SESSIONS, idle.refused,
                  "delivered" if idle.delivered else "NOT delivered",
                  mb(idle.rss_kb), mb(idle.hwm_kb), idle.threads))


def spool_rows(args: argparse.Namespace, sink: Sink, workdir: str, extra: Dict[str, str]):
    """The spool's rows (SPEC 9, bench/spool_bench.py): (always result, outage result)."""
    always = outage = None
    if not args.only or SPOOL_ROWS[0] in args.only:
        print("Spool, spool_mode = always: %s" % CONFIGS[0].name, flush=True)
        always = spool_bench.bench_always(sink, workdir, args.runs, args.scale, extra)
    if not args.only or SPOOL_ROWS[1] in args.only:
        print("Spool outage run", flush=True)
        outage = spool_bench.bench_outage(workdir, args.scale, extra)
    return always, outage


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds per configuration (median is reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts (0.1 = quick try)")
    parser.add_argument("--only", type=int, action="append", choices=range(1, CLIENTS_ROW + 1),
                        help="run only this configuration (1-%d; %d = the AUTH rows, %d and %d the "
                        "spool's, %d the remote limits', %d the client limits'); repeatable" % (
                            len(CONFIGS), AUTH_ROWS, SPOOL_ROWS[0], SPOOL_ROWS[1], LIMITS_ROW, CLIENTS_ROW))
    parser.add_argument("--no-idle", action="store_true", help="skip the idle sessions check")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="extra relay option for bench.ini, e.g. --set remote_pool_size=20")
    parser.add_argument("--direct-only", action="store_true",
                        help="only measure the sink (checks the harness and the machine's limit)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record the relay with py-spy (in the venv) into DIR and print the hot spots")
    parser.add_argument("--cprofile", metavar="DIR",
                        help="run the relay under cProfile (every thread) into DIR and print the hot spots")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (ini, logs)")
    return parser.parse_args(argv)


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.set)
    configs = [(n, scaled(c, args.scale)) for n, c in enumerate(CONFIGS, 1) if not args.only or n in args.only]
    workdir = tempfile.mkdtemp(prefix="smtprelay-bench-")
    os.chmod(workdir, 0o755)  # smtp-sink drops to nobody
    sink = None
    results: List[Result] = []
    idle = None
    auth = None
    spool = (None, None)
    limits = None
    clients = None
    try:
        # The limits row has an upstream of its own; every other row and the idle check use the sink.
        if not args.only or not set(args.only) <= {LIMITS_ROW, CLIENTS_ROW} or not args.no_idle:
            sink = Sink(workdir)
        for folder in (args.profile, args.cprofile):
            if folder:
                os.makedirs(folder, exist_ok=True)
        for n, cfg in configs:
            print("%s: %d messages per run" % (cfg.name, cfg.messages), flush=True)
            profile = os.path.join(args.profile, "relay-%d.txt" % n) if args.profile else None
            cprofile = os.path.join(args.cprofile, "relay-%d.pstats" % n) if args.cprofile else None
            results.append(bench_config(cfg, sink, workdir, args.runs, extra, args.direct_only,
                                        profile, cprofile))
        if (not args.only or AUTH_ROWS in args.only) and not args.direct_only:
            print("AUTH at line rate: STARTTLS, 1 KB, 1 msg/conn", flush=True)
            auth = auth_bench.bench_auth(
                sink, lambda options: Relay(workdir, sink.port, 200, dict(extra, **options), scheme="starttls://"),
                workdir, args.scale, args.runs)
        if not args.direct_only:
            spool = spool_rows(args, sink, workdir, extra)
        if (not args.only or LIMITS_ROW in args.only) and not args.direct_only:
            print("Remote limits: %d clients x %d messages into a %d-connection upstream" % (
                limits_bench.CLIENTS, limits_bench.PER_CLIENT, limits_bench.UPSTREAM_CONNECTIONS), flush=True)
            limits = limits_bench.bench_limits(workdir, extra)
        if (not args.only or CLIENTS_ROW in args.only) and not args.direct_only:
            print("Client limits: one client floods while %d others send" % client_limits_bench.NORMAL_CLIENTS,
                  flush=True)
            clients = client_limits_bench.bench_clients(workdir, extra)
        if not args.no_idle and not args.direct_only:
            print("Idle sessions: opening %d" % IDLE_SESSIONS, flush=True)
            idle = bench_idle(sink, workdir, extra)
    except (BenchError, auth_bench.LoadError) as exc:
        print_table(results, idle, args.runs)
        spool_bench.print_rows(*spool)
        limits_bench.print_rows(limits)
        client_limits_bench.print_rows(clients)
        print("\nFAILED: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if sink:
            sink.close()
        if args.keep:
            print("work folder kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, idle, args.runs)
    if auth:
        auth_bench.print_auth(auth, args.runs)
    spool_bench.print_rows(*spool)
    limits_bench.print_rows(limits)
    client_limits_bench.print_rows(clients)
    if idle and (idle.refused or idle.held != IDLE_SESSIONS or not idle.delivered):
        print("\nFAILED: the relay did not hold %d idle sessions" % IDLE_SESSIONS, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # spool_bench and limits_bench import this module's helpers by name: one module, one BenchError.
    sys.modules["run"] = sys.modules[__name__]
    import client_limits_bench
    import limits_bench
    import spool_bench
    sys.exit(main(sys.argv[1:]))
