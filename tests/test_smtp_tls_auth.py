"""SPEC 3.2 STARTTLS, implicit TLS, AUTH and local_forcetls; SPEC 2.4 users
file behaviour as a client sees it. Real TLS with the test CA."""

import base64
import os
import smtplib
import ssl
import threading
import time

import pytest

from conftest import outbox_messages, wait_until
from smtp_talk import Talk, write_users

PASSWORD = "s3cret-Pa55"


def b64(text):
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def users(tmp_path):
    return write_users(tmp_path / "users", {
        "alice": (PASSWORD, None),
        "bob": (PASSWORD, "bob@example.com,@bob.test,bob"),
    })


@pytest.fixture
def tls_relay(relay_factory, certs):
    """A relay factory for STARTTLS and implicit TLS listeners."""
    def factory(listen="starttls://127.0.0.1:0", **options):
        return relay_factory(listen=listen, local_cert=certs.cert_path, local_key=certs.key_path, **options)
    return factory


def tls_session(relay, certs, ehlo=True):
    """A Talk that has done EHLO, STARTTLS and EHLO again."""
    t = Talk(relay.port)
    assert t.reply().startswith("220 ")
    t.cmd("EHLO x")
    assert t.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    t.starttls(certs.client_context())
    if ehlo:
        assert t.cmd("EHLO x").startswith("250-relay.test")
    return t


# -- STARTTLS -------------------------------------------------------------------

def test_3_2_starttls_is_offered_before_tls_only(tls_relay, certs):
    relay = tls_relay()
    with Talk(relay.port) as t:
        t.reply()
        assert "250-STARTTLS" in t.cmd("EHLO x").split("\n") or t.cmd("EHLO x").endswith("250 STARTTLS")
    with tls_session(relay, certs, ehlo=False) as t:
        assert "STARTTLS" not in t.cmd("EHLO x")


def test_3_2_starttls_then_ehlo_again(tls_relay, certs):
    relay = tls_relay()
    with tls_session(relay, certs, ehlo=False) as t:
        # RFC 3207 4.2: the session starts over, so MAIL needs a new EHLO.
        assert t.cmd("MAIL FROM:<a@example.com>").startswith("503 5.5.1 ")
        assert t.cmd("EHLO x").startswith("250-relay.test")
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
        assert t.cmd("RCPT TO:<b@example.com>") == "250 2.1.5 OK"
        t.cmd("DATA")
        assert t.cmd("hi\r\n.").startswith("250 2.0.0 OK ")
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["tls"] is True
    assert b"with ESMTPS (TLS" in message


def test_3_2_starttls_twice_is_503(tls_relay, certs):
    with tls_session(tls_relay(), certs) as t:
        assert t.cmd("STARTTLS").startswith("503 5.5.1 ")


def test_3_2_starttls_with_arguments_is_501(tls_relay):
    with Talk(tls_relay().port, ehlo="x") as t:
        assert t.cmd("STARTTLS now").startswith("501 5.5.4 ")


def test_3_2_starttls_injection_is_dropped(tls_relay, certs):
    """CVE-2011-0411: commands pipelined after STARTTLS never run under TLS."""
    relay = tls_relay()
    with Talk(relay.port, ehlo="x") as t:
        t.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n")
        assert t.reply() == "220 2.0.0 Ready to start TLS"
        t.starttls(certs.client_context())
        assert t.cmd("EHLO x").startswith("250-")
        # Had the injected MAIL run, this would be a 503 nested MAIL.
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
        assert t.cmd("RSET") == "250 2.0.0 OK"


def test_3_2_starttls_with_smtplib(tls_relay, certs):
    relay = tls_relay()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as client:
        client.starttls(context=certs.client_context())
        assert client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n") == {}
    assert len(outbox_messages(relay.outbox)) == 1


def test_3_2_failed_starttls_handshake_closes(tls_relay):
    relay = tls_relay()
    with Talk(relay.port, ehlo="x") as t:
        t.cmd("STARTTLS")
        t.send(b"this is not a TLS client hello\r\n" * 10)
        assert t.closed()


# -- implicit TLS ---------------------------------------------------------------

def test_3_1_implicit_tls(tls_relay, certs):
    relay = tls_relay(listen="tls://127.0.0.1:0")
    with Talk(relay.port, tls=certs.client_context()) as t:
        assert t.reply() == "220 relay.test ESMTP ready."
        ehlo = t.cmd("EHLO x")
        assert "STARTTLS" not in ehlo
        assert t.cmd("STARTTLS").startswith("503 5.5.1 ")
    with smtplib.SMTP_SSL("127.0.0.1", relay.port, timeout=5, context=certs.client_context()) as client:
        assert client.sendmail("a@example.com", ["b@example.com"], b"x\r\n") == {}
    (meta, message), = outbox_messages(relay.outbox)
    assert meta["tls"] is True


def test_3_1_implicit_tls_plaintext_client_is_closed(tls_relay):
    relay = tls_relay(listen="tls://127.0.0.1:0")
    with Talk(relay.port) as t:
        t.send(b"EHLO x\r\n")
        assert t.closed()
        assert t.buf == b""  # never greeted in plaintext


def test_3_1_implicit_tls_handshake_is_under_read_timeout(tls_relay):
    relay = tls_relay(listen="tls://127.0.0.1:0", read_timeout="1s")
    with Talk(relay.port) as t:
        assert t.closed()  # silent client: closed after read_timeout, well before Talk's 5s


@pytest.mark.parametrize("profile, version, ok", [
    ("modern", ssl.TLSVersion.TLSv1_2, False),
    ("modern", ssl.TLSVersion.TLSv1_3, True),
    ("intermediate", ssl.TLSVersion.TLSv1_2, True),
    ("default", ssl.TLSVersion.TLSv1_2, True),
])
def test_2_3_tls_profile(tls_relay, certs, profile, version, ok):
    relay = tls_relay(listen="tls://127.0.0.1:0", tls_profile=profile)
    context = certs.client_context()
    context.maximum_version = version
    if ok:
        with Talk(relay.port, tls=context) as t:
            assert t.reply().startswith("220 ")
            assert t.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                        ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    else:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            Talk(relay.port, tls=context)


def _tls10_client(certs):
    context = certs.client_context()
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot speak TLS 1.0")
    return context


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_2_3_tls_profile_legacy_admits_tls_1_0(tls_relay, certs):
    relay = tls_relay(listen="tls://127.0.0.1:0", tls_profile="legacy")
    try:
        t = Talk(relay.port, tls=_tls10_client(certs))
    except ssl.SSLError as exc:
        pytest.skip("TLS 1.0 is disabled in this OpenSSL build: %s" % exc)
    with t:
        assert t.reply().startswith("220 ")
        assert t.sock.version() == "TLSv1"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_2_3_tls_profile_default_refuses_tls_1_0(tls_relay, certs):
    relay = tls_relay(listen="tls://127.0.0.1:0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        Talk(relay.port, tls=_tls10_client(certs))


# -- local_forcetls -----------------------------------------------------------

def test_3_2_forcetls_refuses_mail_and_auth_before_starttls(tls_relay, certs, users):
    relay = tls_relay(local_forcetls="true", allowed_users=users)
    with Talk(relay.port, ehlo="x") as t:
        assert t.cmd("MAIL FROM:<a@example.com>") == "530 5.7.0 Must issue a STARTTLS command first"
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)) == \
            "530 5.7.0 Must issue a STARTTLS command first"


def test_3_2_forcetls_allows_mail_after_starttls(tls_relay, certs):
    relay = tls_relay(local_forcetls="true")
    with tls_session(relay, certs) as t:
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"


# -- AUTH -----------------------------------------------------------------------

@pytest.fixture
def auth_relay(tls_relay, users):
    return tls_relay(allowed_users=users)


def test_6_stop_sends_421_inside_tls_to_idle_sessions(tls_relay, certs):
    """The 421 arrives as TLS data, not as a broken TLS stream."""
    starttls = tls_relay()
    implicit = tls_relay(listen="tls://127.0.0.1:0")
    with tls_session(starttls, certs) as t, Talk(implicit.port, tls=certs.client_context()) as u:
        assert u.reply().startswith("220 ")
        started = time.monotonic()
        for relay in (starttls, implicit):
            threading.Thread(target=relay.stop, kwargs={"timeout": 5}).start()
        assert t.reply() == "421 4.3.2 Shutting down"
        assert u.reply() == "421 4.3.2 Shutting down"
        assert time.monotonic() - started < 3  # not read_timeout (60s)
    assert wait_until(lambda: starttls.active_sessions == implicit.active_sessions == 0)


def test_6_stop_ends_a_session_waiting_at_an_auth_prompt(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH LOGIN").startswith("334 ")
        started = time.monotonic()
        auth_relay.stop(timeout=5)
        assert t.reply() == "421 4.3.2 Shutting down"
        assert time.monotonic() - started < 3  # not read_timeout (60s)
    assert auth_relay.active_sessions == 0


def test_3_2_auth_advertised_only_under_tls(auth_relay, certs):
    with Talk(auth_relay.port) as t:
        t.reply()
        assert "AUTH" not in t.cmd("EHLO x")
    with tls_session(auth_relay, certs, ehlo=False) as t:
        assert "250-AUTH PLAIN LOGIN" in t.cmd("EHLO x").split("\n") or \
            t.cmd("EHLO x").endswith("250 AUTH PLAIN LOGIN")


def test_3_2_auth_before_tls_is_538(auth_relay):
    with Talk(auth_relay.port, ehlo="x") as t:
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)).startswith("538 5.7.11 ")


def test_3_2_auth_plain_initial_response(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)) == "235 2.7.0 Authentication successful"
        assert t.cmd("MAIL FROM:<anyone@example.com>") == "250 2.1.0 OK"


def test_3_2_auth_plain_challenge(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN") == "334 "
        assert t.cmd(b64("\0ALICE\0" + PASSWORD)).startswith("235 2.7.0 ")


def test_3_2_auth_login(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
        assert t.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
        assert t.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")


def test_3_2_auth_login_initial_response(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("auth login " + b64("alice")) == "334 UGFzc3dvcmQ6"
        assert t.cmd(b64(PASSWORD)).startswith("235 2.7.0 ")


def test_3_2_auth_with_smtplib(auth_relay, certs):
    with smtplib.SMTP("127.0.0.1", auth_relay.port, timeout=5) as client:
        client.starttls(context=certs.client_context())
        client.login("alice", PASSWORD)
        assert client.sendmail("a@example.com", ["b@example.com"], b"x\r\n") == {}
    (meta, message), = outbox_messages(auth_relay.outbox)
    assert meta["username"] == "alice"
    assert b"with ESMTPSA" in message


def test_3_2_auth_cancel_is_501(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH LOGIN")
        assert t.cmd("*").startswith("501 5.5.2 ")
        t.cmd("AUTH PLAIN")
        assert t.cmd("*").startswith("501 5.5.2 ")


def test_3_2_auth_bad_base64_is_501(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN !!!notbase64").startswith("501 5.5.2 ")
        assert t.cmd("AUTH PLAIN " + b64("no separators")).startswith("501 5.5.2 ")


def test_3_2_auth_unknown_mechanism_is_504(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH CRAM-MD5").startswith("504 5.5.4 ")


def test_3_2_auth_bad_password_is_535(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0wrong")) == "535 5.7.8 Authentication credentials invalid"
        assert t.cmd("AUTH PLAIN " + b64("\0nobody\0" + PASSWORD)).startswith("535 5.7.8 ")
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)).startswith("235 2.7.0 ")


def test_3_2_auth_three_failures_is_421(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0wrong1")).startswith("535 5.7.8 ")
        assert t.cmd("AUTH LOGIN " + b64("alice")).startswith("334 ")
        assert t.cmd(b64("wrong2")).startswith("535 5.7.8 ")
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0wrong3")) == "421 4.7.0 Too many authentication failures"
        assert t.closed()


def test_3_2_auth_twice_is_503(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD))
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)).startswith("503 5.5.1 ")


def test_3_2_auth_before_ehlo_is_503(auth_relay, certs):
    with tls_session(auth_relay, certs, ehlo=False) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD)).startswith("503 5.5.1 ")


def test_3_2_mail_before_auth_is_530(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("MAIL FROM:<a@example.com>") == "530 5.7.0 Authentication required"


def test_3_2_rset_keeps_auth(auth_relay, certs):
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD))
        t.cmd("MAIL FROM:<a@example.com>")
        assert t.cmd("RSET") == "250 2.0.0 OK"
        assert t.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"


@pytest.mark.parametrize("sender, ok", [
    ("bob@example.com", True), ("BOB@Example.COM", True), ("anyone@bob.test", True),
    ("bob", True), ("bob@other.test", False), ("alice@example.com", False), ("", False),
])
def test_2_4_allowed_from(auth_relay, certs, sender, ok):
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH PLAIN " + b64("\0bob\0" + PASSWORD))
        reply = t.cmd("MAIL FROM:<%s>" % sender)
        assert reply == "250 2.1.0 OK" if ok else reply.startswith("553 5.7.1 ")


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_2_4_hash_versions(tls_relay, certs, tmp_path, prefix):
    path = write_users(tmp_path / "users", {"carol": (PASSWORD, None)}, prefix=prefix)
    with tls_session(tls_relay(allowed_users=path), certs) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0carol\0" + PASSWORD)).startswith("235 2.7.0 ")


def test_2_4_users_file_is_reread(auth_relay, certs, users):
    with open(users, "a") as f:
        f.write("not a valid line\n")
    write_users(users + ".new", {"dave": ("pw-dave", None)})
    with open(users + ".new") as f:
        dave = f.read().splitlines()[1]
    with open(users, "a") as f:
        f.write(dave + "\n")
    st = os.stat(users)
    os.utime(users, (st.st_atime, st.st_mtime + 5))  # a different mtime, whatever the clock
    with tls_session(auth_relay, certs) as t:
        assert t.cmd("AUTH PLAIN " + b64("\0dave\0pw-dave")).startswith("235 2.7.0 ")


def test_6_auth_never_logs_the_password(auth_relay, certs, relay_log):
    caplog = relay_log  # every level, trace included: the dialogue is logged there
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH PLAIN " + b64("\0alice\0" + PASSWORD))
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH LOGIN " + b64("alice"))
        t.cmd(b64(PASSWORD))
    with tls_session(auth_relay, certs) as t:
        t.cmd("AUTH PLAIN")
        t.cmd(b64("\0alice\0wrong" + PASSWORD))
    text = "\n".join("%s %s" % (r.getMessage(), getattr(r, "fields", "")) for r in caplog.records)
    assert "AUTH" in text  # the commands were logged, masked
    for secret in (PASSWORD, b64(PASSWORD), b64("\0alice\0" + PASSWORD), b64("\0alice\0wrong" + PASSWORD)):
        assert secret not in text


def test_3_2_slow_auth_does_not_stall_other_sessions(tls_relay, certs, tmp_path):
    """bcrypt at cost 12 takes a while; another client is served meanwhile."""
    import bcrypt

    hashed = bcrypt.hashpw(b"slow", bcrypt.gensalt(rounds=12)).decode()
    path = tmp_path / "users"
    path.write_text("slow %s\n" % hashed)
    relay = tls_relay(allowed_users=str(path))
    done = threading.Event()
    t = tls_session(relay, certs)
    t.send(("AUTH PLAIN %s\r\n" % b64("\0slow\0slow")).encode())

    def wait_auth():
        t.reply()
        done.set()

    waiter = threading.Thread(target=wait_auth)
    waiter.start()
    with Talk(relay.port) as other:
        other.reply()
        assert other.cmd("NOOP") == "250 2.0.0 OK"
        served_during_auth = not done.is_set()
    waiter.join(10)
    t.close()
    assert done.is_set()
    assert served_during_auth
