"""AUTH at line rate (SPEC 2.4): the TLS rows of the benchmark.

A load generator of its own (smtp-source has no TLS): threads with smtplib,
one 1 KB message per connection, STARTTLS on every connection, against a
`starttls://` listener that forwards to the smtp-sink. Rows:

- (a) no AUTH and (b) AUTH PLAIN with a cost-12 hash, in the same run; the
  ratio b/a must be at least 0.5 (aim 0.8).
- guessing: 5 legitimate clients deliver while 20 clients send wrong
  passwords as fast as they can (from one address, then from 20); the
  legitimate rate under attack over the rate without it must be at least 0.5.

run.py calls bench_auth() with its sink and a function that starts a relay.
"""

import base64
import multiprocessing
import os
import secrets
import smtplib
import ssl
import statistics
import subprocess
import threading
import time
from collections import Counter
from typing import Callable, Dict, List, NamedTuple, Optional

import bcrypt

HOST = "127.0.0.1"
SENDER = "bench@example.com"
RECIPIENT = "sink@example.org"
USER, PASSWORD = "bench", "bench-password"
CLIENTS = 20
MESSAGES = 4000  # per run of rows (a) and (b), at scale 1
LEGIT_CLIENTS = 5
LEGIT_MESSAGES = 1500  # per phase of the guessing run, at scale 1
GUESSERS = 20
RATIO_MIN, RATIO_AIM = 0.5, 0.8
UNDER_ATTACK_MIN = 0.5
BODY = (b"Subject: auth bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 13)[:1024] + b"\r\n"


class LoadError(Exception):
    """The load did not go through (a refused message, a client that failed)."""


class Credentials(NamedTuple):
    user: str
    password: str


CREDENTIALS = Credentials(USER, PASSWORD)

def make_tls_files(workdir: str) -> Dict[str, str]:
    """A throw-away self-signed certificate for the listener, made with openssl."""
    cert, key = os.path.join(workdir, "auth-cert.pem"), os.path.join(workdir, "auth-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"local_cert": cert, "local_key": key}


def make_users(workdir: str) -> str:
    path = os.path.join(workdir, "auth-users")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    with open(path, "w") as f:
        f.write("%s %s\n" % (USER, hashed))
    return path


def client_context() -> ssl.SSLContext:
    """The bench trusts its own throw-away certificate without checking it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def open_session(port: int, ctx: ssl.SSLContext, source: Optional[str] = None) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, local_hostname="client.bench", timeout=120,
                          source_address=(source, 0) if source else None)
    client.starttls(context=ctx)
    client.ehlo()
    return client


def send_one(port: int, ctx: ssl.SSLContext, credentials: Optional[Credentials]) -> None:
    with open_session(port, ctx) as client:
        if credentials:
            client.login(*credentials)  # AUTH PLAIN: the relay offers PLAIN LOGIN
        client.sendmail(SENDER, [RECIPIENT], BODY)


def send_load(port: int, clients: int, messages: int, credentials: Optional[Credentials]) -> float:
    """`messages` messages, one per connection, from `clients` threads; returns seconds."""
    ctx = client_context()
    remaining = [messages]
    lock = threading.Lock()
    errors: List[Exception] = []

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0 or errors:
                    return
                remaining[0] -= 1
            try:
                send_one(port, ctx, credentials)
            except (OSError, smtplib.SMTPException) as exc:
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise LoadError("%d client(s) failed; first: %r" % (len(errors), errors[0]))
    return elapsed


def guess(port: int, sources: List[str], stop, results) -> None:
    """GUESSERS threads sending wrong passwords until `stop`; puts a Counter of
    reply codes on `results`. Runs in a process of its own so that its CPU
    does not slow the legitimate clients' generator."""
    ctx = client_context()
    tally: Counter = Counter()
    lock = threading.Lock()

    def worker(source: str) -> None:
        while not stop.is_set():
            try:
                with open_session(port, ctx, source) as client:
                    for _ in range(2):  # a third failure closes the session (SPEC 3.2)
                        plain = base64.b64encode(("\0%s\0%s" % (USER, secrets.token_hex(8))).encode())
                        code, _ = client.docmd("AUTH", "PLAIN " + plain.decode())
                        with lock:
                            tally[code] += 1
            except (OSError, smtplib.SMTPException):
                with lock:
                    tally["dropped"] += 1

    threads = [threading.Thread(target=worker, args=(sources[n % len(sources)],)) for n in range(GUESSERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(dict(tally))


class AttackResult(NamedTuple):
    name: str
    quiet: float  # legitimate msgs/s without the attack
    attacked: float  # legitimate msgs/s under attack
    replies: Dict  # the guessers' reply codes and their counts

    @property
    def ratio(self) -> float:
        return self.attacked / self.quiet


class AuthResult(NamedTuple):
    messages: int
    plain: float  # msgs/s, row (a)
    auth: float  # msgs/s, row (b)
    ratio: float  # median of the per-round ratios b/a
    plain_cpu_ms: float
    auth_cpu_ms: float
    attacks: List[AttackResult]


def measure(sink, relay, clients: int, messages: int, credentials: Optional[Credentials]):
    """(msgs/s, relay CPU ms per message) of one load, checked against the sink."""
    before, cpu = sink.count(), relay.cpu_seconds()
    elapsed = send_load(relay.port, clients, messages, credentials)
    received = sink.wait_count(before + messages) - before
    if received != messages:
        raise LoadError("the sink received %d of %d messages" % (received, messages))
    relay.check_alive()
    return messages / elapsed, (relay.cpu_seconds() - cpu) * 1000 / messages


def attack(sink, relay, messages: int, sources: List[str], quiet: float, name: str) -> AttackResult:
    """The legitimate load while GUESSERS clients guess from `sources`."""
    ctx = multiprocessing.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    guessers = ctx.Process(target=guess, args=(relay.port, sources, stop, results))
    guessers.start()
    try:
        time.sleep(1.0)  # let the guessing get going before the legitimate load starts
        attacked, _ = measure(sink, relay, LEGIT_CLIENTS, messages, CREDENTIALS)
    finally:
        stop.set()
        replies = results.get(timeout=180)
        guessers.join(30)
    return AttackResult(name, quiet, attacked, replies)


def bench_auth(sink, start_relay: Callable[[Dict[str, str]], object], workdir: str,
               scale: float, runs: int) -> AuthResult:
    """Rows (a), (b) and the guessing runs. `start_relay(options)` starts a
    relay with a starttls:// listener and those extra ini options."""
    tls = make_tls_files(workdir)
    users = make_users(workdir)
    messages = max(CLIENTS, round(MESSAGES * scale))
    legit = max(LEGIT_CLIENTS, round(LEGIT_MESSAGES * scale))
    plain_relay = start_relay(dict(tls))
    auth_relay = start_relay(dict(tls, allowed_users=users))
    try:
        rows = []
        for n in range(1, runs + 1):
            plain, plain_cpu = measure(sink, plain_relay, CLIENTS, messages, None)
            auth, auth_cpu = measure(sink, auth_relay, CLIENTS, messages, CREDENTIALS)
            rows.append((plain, auth, auth / plain, plain_cpu, auth_cpu))
            print("  round %d: no AUTH %6.0f msgs/s   AUTH PLAIN (cost 12) %6.0f msgs/s   ratio %.3f   "
                  "relay CPU %.2f / %.2f ms/msg" % ((n,) + rows[-1]), flush=True)
        quiet, _ = measure(sink, auth_relay, LEGIT_CLIENTS, legit, CREDENTIALS)
        print("  guessing: %d legitimate clients alone %.0f msgs/s" % (LEGIT_CLIENTS, quiet), flush=True)
        attacks = []
        for name, sources in (("one address", ["127.0.0.2"]),
                              ("%d addresses" % GUESSERS, ["127.0.0.%d" % (n + 10) for n in range(GUESSERS)])):
            attacks.append(attack(sink, auth_relay, legit, sources, quiet, name))
            print("  guessing from %s: legitimate %.0f msgs/s (%.2f of alone); guessers' replies %s" % (
                name, attacks[-1].attacked, attacks[-1].ratio, attacks[-1].replies), flush=True)
    finally:
        plain_relay.close()
        auth_relay.close()
    column = list(zip(*rows))
    return AuthResult(messages, statistics.median(column[0]), statistics.median(column[1]),
                      statistics.median(column[2]), statistics.median(column[3]),
                      statistics.median(column[4]), attacks)


def print_auth(result: AuthResult, runs: int) -> None:
    print()
    print("AUTH at line rate (SPEC 2.4), STARTTLS, 1 KB, 1 msg/conn; median of %d rounds" % runs)
    print("| row | messages | msgs/s | relay CPU ms/msg | ratio | floor / aim |")
    print("|---|---|---|---|---|---|")
    print("| (a) no AUTH, %d clients | %d | %.0f | %.2f | | |" % (
        CLIENTS, result.messages, result.plain, result.plain_cpu_ms))
    print("| (b) AUTH PLAIN, cost-12 hash, %d clients | %d | %.0f | %.2f | %.3f (b/a) | %.2f / %.2f (%s) |" % (
        CLIENTS, result.messages, result.auth, result.auth_cpu_ms, result.ratio, RATIO_MIN, RATIO_AIM,
        verdict(result.ratio, RATIO_MIN)))
    for a in result.attacks:
        print("| %d legitimate clients, %d guessing from %s | | %.0f (alone %.0f) | | %.3f | %.2f (%s) |" % (
            LEGIT_CLIENTS, GUESSERS, a.name, a.attacked, a.quiet, a.ratio, UNDER_ATTACK_MIN,
            verdict(a.ratio, UNDER_ATTACK_MIN)))


def verdict(value: float, floor: float) -> str:
    return "ok" if value >= floor else "below"
