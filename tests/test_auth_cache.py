"""SPEC 2.4 AUTH at line rate: the verification cache, the bound on bcrypt
runs and the penalty for an address that keeps guessing. Real relays over
real TLS; "no bcrypt run" is read from the count the relay's guard keeps
(`relay.users.guard.bcrypt_runs`), or from the time a cost-12 check takes."""

import base64
import hashlib
import os
import threading
import time

import bcrypt
import pytest

from relay_lib import replies
from relay_lib.inbound import authcache
from smtp_talk import Talk, write_users

PASSWORD = "s3cret-Pa55"
PENALTY = "454 4.7.0 Too many authentication failures, try again later"
FAILED = "535 5.7.8 Authentication credentials invalid"


def plain(user, password):
    return "AUTH PLAIN " + base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()


@pytest.fixture
def users(tmp_path):
    return write_users(tmp_path / "users", {"alice": (PASSWORD, None), "bob": (PASSWORD, None)})


@pytest.fixture
def auth_relay(relay_factory, certs, users):
    def factory(**options):
        options.setdefault("allowed_users", users)
        return relay_factory(listen="starttls://127.0.0.1:0", local_cert=certs.cert_path,
                             local_key=certs.key_path, **options)
    return factory


def auth(relay, certs, user, password, source=None):
    """One session from `source`: EHLO, STARTTLS, EHLO, one AUTH PLAIN.
    Returns (the AUTH reply, seconds it took)."""
    with Talk(relay.port, source=source) as t:
        assert t.reply().startswith("220 ")
        t.cmd("EHLO x")
        assert t.cmd("STARTTLS").startswith("220 ")
        t.starttls(certs.client_context())
        assert t.cmd("EHLO x").startswith("250-")
        start = time.perf_counter()
        reply = t.cmd(plain(user, password))
        return reply, time.perf_counter() - start


def touch_later(path):
    """A different mtime, whatever the clock's resolution."""
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + 5))


# -- the cache of successful checks ----------------------------------------------

def test_2_4_second_auth_of_a_user_runs_no_bcrypt(auth_relay, certs, tmp_path):
    path = tmp_path / "users12"
    path.write_text("carol %s\n" % bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode())
    relay = auth_relay(allowed_users=str(path))
    first, first_time = auth(relay, certs, "carol", PASSWORD)
    second, second_time = auth(relay, certs, "Carol", PASSWORD)  # user names fold case
    assert first == second == "235 2.7.0 Authentication successful"
    assert relay.users.guard.bcrypt_runs == 1
    assert second_time < first_time / 5, (first_time, second_time)


def test_2_4_changed_users_file_forgets_every_entry(auth_relay, certs, users):
    relay = auth_relay()
    assert auth(relay, certs, "alice", PASSWORD)[0].startswith("235 ")
    assert auth(relay, certs, "bob", PASSWORD)[0].startswith("235 ")
    with open(users) as f:
        bob_line = f.read().splitlines()[2]
    write_users(users, {"alice": ("new-password", None)})
    with open(users, "a") as f:
        f.write(bob_line + "\n")  # bob's line is unchanged
    touch_later(users)
    runs = relay.users.guard.bcrypt_runs
    assert auth(relay, certs, "alice", PASSWORD)[0] == FAILED
    assert auth(relay, certs, "alice", "new-password")[0].startswith("235 2.7.0 ")
    assert auth(relay, certs, "bob", PASSWORD)[0].startswith("235 2.7.0 ")
    assert relay.users.guard.bcrypt_runs == runs + 3  # bob's entry died with the old file too


def test_2_4_auth_cache_ttl_0_turns_the_cache_off(auth_relay, certs):
    relay = auth_relay(auth_cache_ttl="0")
    for password in (PASSWORD, PASSWORD, "wrong", "wrong"):
        auth(relay, certs, "alice", password)
    assert relay.users.guard.bcrypt_runs == 4


def test_2_3_auth_cache_ttl_is_a_duration(auth_relay):
    assert auth_relay().settings.auth_cache_ttl == 3600.0
    assert auth_relay(auth_cache_ttl="90s").settings.auth_cache_ttl == 90.0


# -- the cache of failed checks and the penalty ------------------------------------

def test_2_4_failed_check_is_answered_from_the_cache(auth_relay, certs):
    relay = auth_relay()
    assert auth(relay, certs, "alice", "wrong")[0] == FAILED
    assert auth(relay, certs, "alice", "wrong")[0] == FAILED
    assert auth(relay, certs, "nobody", "wrong")[0] == FAILED
    assert auth(relay, certs, "nobody", "wrong")[0] == FAILED
    assert relay.users.guard.bcrypt_runs == 2


def test_2_4_ten_guesses_from_one_address_get_454(auth_relay, certs, relay_log):
    relay = auth_relay()
    for n in range(10):
        assert auth(relay, certs, "alice", "guess-%d" % n)[0] == FAILED
    runs = relay.users.guard.bcrypt_runs
    started = time.monotonic()
    assert auth(relay, certs, "alice", "guess-10")[0] == PENALTY
    assert time.monotonic() - started >= 0.9  # a guesser gets its 454 a second late
    assert auth(relay, certs, "alice", PASSWORD)[0] == PENALTY
    assert auth(relay, certs, "bob", PASSWORD)[0] == PENALTY
    assert relay.users.guard.bcrypt_runs == runs
    # Another address behind the same relay still gets in.
    assert auth(relay, certs, "alice", PASSWORD, source="127.0.0.2")[0].startswith("235 2.7.0 ")
    warnings = [r for r in relay_log.records if r.getMessage().startswith("too many authentication failures")]
    assert len(warnings) == 1
    assert warnings[0].levelname == "WARNING"
    assert warnings[0].fields["client"] == "127.0.0.1"


def test_2_4_one_wrong_password_repeated_does_not_trigger_the_penalty(auth_relay, certs):
    relay = auth_relay()
    with Talk(relay.port) as t:
        t.reply()
        t.cmd("EHLO x")
        t.cmd("STARTTLS")
        t.starttls(certs.client_context())
        t.cmd("EHLO x")
        for _ in range(2):  # a third failure in one session closes it (SPEC 3.2)
            assert t.cmd(plain("alice", "stale-password")) == FAILED
    for _ in range(48):
        assert auth(relay, certs, "alice", "stale-password")[0] == FAILED
    assert auth(relay, certs, "alice", PASSWORD)[0].startswith("235 2.7.0 ")
    assert relay.users.guard.bcrypt_runs == 2


def test_2_4_no_password_or_keyed_hash_in_the_log(auth_relay, certs, relay_log):
    relay = auth_relay(log_level="trace")
    for password in (PASSWORD, PASSWORD, "wrong-" + PASSWORD, "wrong-" + PASSWORD):
        auth(relay, certs, "alice", password)
    key = relay.users.guard._key
    secrets = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
               plain("alice", PASSWORD)[len("AUTH PLAIN "):]]
    for password in (PASSWORD, "wrong-" + PASSWORD):
        digest = hashlib.blake2b(password.encode(), key=key).digest()
        secrets += [digest.hex(), repr(digest), base64.b64encode(digest).decode()]
    text = "\n".join("%s %s" % (r.getMessage(), getattr(r, "fields", "")) for r in relay_log.records)
    assert "authenticated" in text and "authentication failed" in text
    for secret in secrets:
        assert secret not in text


# -- the guard alone: clocks, bounds and the bcrypt semaphore --------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def checker(guard, address="192.0.2.1"):
    """check() with a verify that counts as bcrypt would: the password 'right' matches."""
    def check(password, user="u"):
        return guard.check(address, user, password.encode(), b"$2b$hash", lambda: password == "right")
    return check


def test_2_4_entries_expire_after_the_ttl_and_failures_after_5_minutes():
    clock = Clock()
    guard = authcache.AuthGuard(ttl=3600, wait=1, clock=clock)
    check = checker(guard)
    assert check("right") is None and check("wrong") is replies.AUTH_FAILED
    clock.now += 299
    check("right"), check("wrong")
    assert guard.bcrypt_runs == 2
    clock.now += 2
    assert check("wrong") is replies.AUTH_FAILED and guard.bcrypt_runs == 3
    clock.now += 3300
    check("right")
    assert guard.bcrypt_runs == 4


def test_2_4_penalty_counts_failures_within_15_minutes_and_lasts_15_minutes():
    clock = Clock()
    guard = authcache.AuthGuard(ttl=3600, wait=1, clock=clock)
    check = checker(guard)
    for n in range(9):
        check("guess-%d" % n)
    clock.now += 901  # the first nine fall out of the window one by one
    for n in range(9, 18):
        assert check("guess-%d" % n) is replies.AUTH_FAILED
    assert check("guess-18") is replies.AUTH_FAILED  # the tenth within 15 minutes
    assert check("right") is replies.AUTH_PENALTY
    assert checker(guard, "192.0.2.2")("right") is None
    clock.now += 899
    assert check("right") is replies.AUTH_PENALTY
    clock.now += 2
    assert check("right") is None


def test_2_4_cache_holds_at_most_10000_entries():
    guard = authcache.AuthGuard(ttl=3600, wait=1)
    check = checker(guard)
    for n in range(authcache.CACHE_ENTRIES + 1):
        check("right", user="user%d" % n)
    runs = guard.bcrypt_runs
    check("right", user="user%d" % authcache.CACHE_ENTRIES)
    assert guard.bcrypt_runs == runs
    check("right", user="user0")  # the least recently used went out
    assert guard.bcrypt_runs == runs + 1


def test_2_4_penalty_table_is_bounded():
    guard = authcache.AuthGuard(ttl=3600, wait=1)
    for n in range(authcache.PENALTY_ADDRESSES + 1):
        checker(guard, "10.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255))("wrong-%d" % n)
    assert len(guard.penalties._failures) == authcache.PENALTY_ADDRESSES


def test_2_4_at_most_workers_bcrypt_checks_at_once_the_rest_wait():
    guard = authcache.AuthGuard(ttl=3600, wait=5, workers=2)
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def verify():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(5)
        with lock:
            running[0] -= 1
        return False

    threads = [threading.Thread(target=guard.check, args=("192.0.2.%d" % n, "u", b"p%d" % n, b"h", verify))
               for n in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while running[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert peak[0] == 2
    assert guard.bcrypt_runs == 6


def test_2_4_bcrypt_queue_wait_is_bounded():
    guard = authcache.AuthGuard(ttl=3600, wait=0.2, workers=1)
    release = threading.Event()
    busy = threading.Thread(target=guard.check, args=("192.0.2.1", "u", b"p", b"h", lambda: release.wait(5)))
    busy.start()
    deadline = time.monotonic() + 5
    while guard.bcrypt_runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert guard.check("192.0.2.2", "v", b"q", b"h", lambda: True) is replies.AUTH_BUSY
    finally:
        release.set()
        busy.join(10)
    assert guard.check("192.0.2.2", "v", b"q", b"h", lambda: True) is None


def test_2_4_sessions_bringing_the_same_password_share_one_bcrypt_run():
    guard = authcache.AuthGuard(ttl=3600, wait=5, workers=2)
    release = threading.Event()
    outcomes = []

    def check():
        outcomes.append(guard.check("192.0.2.1", "u", b"right", b"h", lambda: release.wait(5)))

    threads = [threading.Thread(target=check) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while guard.bcrypt_runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert outcomes == [None] * 6
    assert guard.bcrypt_runs == 1
