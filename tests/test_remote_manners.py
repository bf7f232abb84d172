"""SPEC 5.3 towards remotes: QUIT after a failed transaction, a TLS mode
mismatch that fails at once with a message saying so, remote_timeout over
each whole reply; SPEC 3.1: a TCP health check on a tls:// listener is no
warning."""

import socket
import time

import pytest

from conftest import stopped_at_teardown, wait_until
from delivery_kit import deliver_once
from remote_kit import ScriptedSMTP, elapsed, wait_closed

TEMPFAIL = "451 4.4.1 Forwarding failed, try again later"


@pytest.fixture
def scripted():
    yield from stopped_at_teardown(ScriptedSMTP)


def remote_errors(relay_log):
    return [r.fields["error"] for r in relay_log.records if r.getMessage() == "remote failed"]


# -- QUIT after a failed transaction ------------------------------------------------

@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
def test_5_3_quit_after_refused_recipient(tmp_path, scripted, pipelining):
    remote = scripted(pipelining=pipelining, replies={"RCPT": b"550 5.1.1 no such user",
                                                      "DATA": b"554 5.5.1 no valid recipients"})
    reply, _ = deliver_once(tmp_path, remotes=remote.url())
    assert str(reply) == "550 5.1.1 127.0.0.1: no such user"
    assert wait_closed(remote)
    verbs = [line.split()[0].upper() for line in remote.lines]
    assert verbs == ["EHLO", "MAIL", "RCPT"] + (["DATA"] if pipelining else []) + ["QUIT"]


def test_5_3_quit_after_refused_message(tmp_path, scripted):
    remote = scripted(replies={"DOT": b"554 5.7.1 spam"})
    reply, _ = deliver_once(tmp_path, remotes=remote.url())
    assert str(reply) == "554 5.7.1 127.0.0.1: spam"
    assert wait_closed(remote)
    assert remote.lines[-1] == "QUIT"


def test_5_3_quit_after_refused_setup(tmp_path, scripted):
    """starttls:// to a remote that offers no STARTTLS: refused before MAIL, still a QUIT."""
    remote = scripted()
    reply, _ = deliver_once(tmp_path, remotes=remote.url("starttls"))
    assert str(reply) == TEMPFAIL
    assert wait_closed(remote)
    assert [line.split()[0].upper() for line in remote.lines] == ["EHLO", "QUIT"]


def test_5_3_no_quit_when_the_remote_waits_for_a_body(tmp_path, scripted):
    """Pipelined: RCPT refused but DATA accepted with 354. A QUIT now would be
    body text; the relay drops the connection instead and sends no body."""
    remote = scripted(pipelining=True, replies={"RCPT": b"550 5.1.1 no such user"})
    reply, _ = deliver_once(tmp_path, remotes=remote.url())
    assert reply.code == 550
    assert wait_closed(remote)
    assert [line.split()[0].upper() for line in remote.lines] == ["EHLO", "MAIL", "RCPT", "DATA"]


# -- a TLS mode that does not match the remote fails fast ------------------------

def test_5_3_starttls_remote_that_speaks_implicit_tls_fails_fast(tmp_path, scripted, certs, relay_log):
    remote = scripted(tls=certs.server_context())
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=remote.url("starttls"), remote_timeout="2s")
    assert str(reply) == TEMPFAIL
    assert elapsed(started) < 1.9  # not the whole remote_timeout
    (error,) = remote_errors(relay_log)
    assert "expects implicit TLS (use tls:// or smtps://)" in error


def test_5_3_tls_remote_that_speaks_plain_smtp_fails_fast(tmp_path, scripted, relay_log):
    remote = scripted()
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=remote.url("tls"), remote_timeout="5s")
    assert str(reply) == TEMPFAIL
    assert elapsed(started) < 2
    (error,) = remote_errors(relay_log)
    assert "answered in plain text, not TLS: it expects STARTTLS" in error


def test_5_3_remote_that_never_greets_times_out_after_remote_timeout(tmp_path, scripted, relay_log):
    """Mute to the greeting wait and to the TLS probe alike: a plain timeout."""
    remote = scripted(greet=False)
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=remote.url(), remote_timeout="1s")
    assert str(reply) == TEMPFAIL
    assert 0.9 < elapsed(started) < 1.6
    (error,) = remote_errors(relay_log)
    assert "sent no greeting: timed out after 1s" in error


def test_5_3_port_25_remote_that_greets_late_is_never_spoken_to_first(tmp_path, scripted):
    """Postfix postscreen delays its greeting and blocks a client that speaks
    first: on port 25 the relay waits the whole remote_timeout for it."""
    try:
        remote = scripted(greet_delay=1.5, port=25)
    except OSError as exc:
        pytest.skip("cannot listen on 127.0.0.1:25 here: %s" % exc)
    reply, _ = deliver_once(tmp_path, remotes=remote.url(), remote_timeout="2s")
    assert reply.code == 250
    assert remote.pregreet == b""


# -- remote_timeout bounds each whole reply ---------------------------------------

def test_5_3_remote_trickling_its_reply_times_out_after_remote_timeout(tmp_path, scripted, relay_log):
    """One byte every 0.1 s: each read succeeds, the reply takes 2.5 s."""
    remote = scripted(trickle=0.1)
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=remote.url(), remote_timeout="1s")
    assert str(reply) == TEMPFAIL
    assert 0.9 < elapsed(started) < 1.6
    (error,) = remote_errors(relay_log)
    assert "no complete reply within 1s" in error


def test_5_3_slow_but_steady_remote_still_delivers(tmp_path, scripted):
    """Each reply within remote_timeout, the whole transaction beyond it."""
    remote = scripted(trickle=0.01)
    started = time.monotonic()
    reply, _ = deliver_once(tmp_path, remotes=remote.url(), remote_timeout="1s")
    assert reply.code == 250
    assert elapsed(started) > 1


# -- 3.1: a TCP health check on a tls:// listener ---------------------------------

def test_3_1_tcp_health_check_on_tls_listener_is_logged_at_debug(relay_factory, certs, relay_log):
    relay = relay_factory(listen="tls://127.0.0.1:0", local_cert=certs.cert_path, local_key=certs.key_path)
    socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
    assert wait_until(lambda: any(r.getMessage() == "closed before TLS" for r in relay_log.records))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(b"EHLO not-tls\r\n")  # a client that did send something: a real failure
    assert wait_until(lambda: any(r.getMessage() == "tls handshake failed" for r in relay_log.records))
    probes = [r for r in relay_log.records if r.getMessage() == "closed before TLS"]
    failed = [r for r in relay_log.records if r.getMessage() == "tls handshake failed"]
    assert [r.levelname for r in probes] == ["DEBUG"] and [r.levelname for r in failed] == ["WARNING"]
