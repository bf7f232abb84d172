"""SPEC 13: the simulated rate-limited upstream (tests/upstream_sim.py) that the
remote-limit tests and the bench rely on, tested with smtplib and raw sockets.

Replies are written out as the providers send them, not taken from the
simulator's constants, so a wrong constant fails here.
"""

import smtplib
import socket
import threading
import time

import pytest

from smtp_talk import Talk
from upstream_sim import UpstreamSim

MESSAGE = b"Subject: sim\r\n\r\nhello\r\n"


class FakeClock:
    """A clock the test moves by hand, for the rate window."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def sim_factory():
    """Start simulators with the given options; stop each at teardown and check
    that it left no thread and hit no unexpected exception."""
    started = []
    before = set(threading.enumerate())

    def start(**options):
        sim = UpstreamSim(**options).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
        assert sim.errors == []
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("upstream-sim")] == []


def client(sim, timeout=5.0):
    smtp = smtplib.SMTP(sim.host, sim.port, timeout=timeout)
    smtp.ehlo("client.test")
    return smtp


def test_13_sim_counts_concurrent_connections(sim_factory):
    sim = sim_factory()
    clients = [client(sim) for _ in range(3)]
    assert sim.wait_for(lambda: sim.open_now == 3)
    clients[0].quit()
    assert sim.wait_for(lambda: sim.open_now == 2)
    clients.append(client(sim))
    assert sim.wait_for(lambda: sim.open_now == 3)
    for c in clients[1:]:
        c.quit()
    assert sim.wait_for(lambda: sim.open_now == 0)
    assert (sim.connections, sim.max_seen) == (4, 3)
    assert sim.refusals == []


def test_13_sim_refuses_the_fourth_at_mail_with_432(sim_factory):
    sim = sim_factory(max_connections=3, refuse_at="mail")
    first = [client(sim) for _ in range(3)]
    fourth = client(sim)  # greeted and EHLO answered, as Microsoft 365 does
    assert fourth.mail("a@example.com") == (432, b"4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")
    for c in first:
        c.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert sim.refusals == [("mail", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")]
    assert sim.max_seen == 4
    first[0].quit()
    assert sim.wait_for(lambda: sim.open_now == 3)
    # A slot freed: the same connection's next MAIL takes it.
    assert fourth.sendmail("a@example.com", ["b@example.com"], MESSAGE) == {}
    assert len(sim.messages) == 4
    for c in first[1:] + [fourth]:
        c.quit()


def test_13_sim_refuses_past_the_limit_at_greeting_with_421(sim_factory):
    sim = sim_factory(max_connections=3, refuse_at="greeting")
    first = [client(sim) for _ in range(3)]
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(sim.host, sim.port, timeout=5)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.startswith(b"4.3.2 ")
    assert sim.wait_for(lambda: sim.open_now == 3)
    assert sim.refusals == [("greeting", "421 4.3.2 Too many concurrent connections, closing "
                                         "transmission channel")]
    for c in first:
        c.quit()


def test_13_sim_refuses_past_the_rate_with_421_and_closes(sim_factory):
    clock = FakeClock()
    sim = sim_factory(rate=(2, 60), clock=clock)
    smtp = client(sim)
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    clock.now += 30
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert smtp.mail("a@example.com") == (421, b"4.7.0 Try again later, closing connection")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.noop()
    assert sim.refusals == [("mail", "421 4.7.0 Try again later, closing connection")]
    # The window slides: 60 s after the first message there is room for one.
    clock.now += 30
    smtp = client(sim)
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert smtp.mail("a@example.com")[0] == 421
    assert len(sim.messages) == 3
    assert len(sim.refusals) == 2


def test_13_sim_rate_counts_transactions_under_way(sim_factory):
    sim = sim_factory(rate=(1, 60), clock=FakeClock())
    first, second = client(sim), client(sim)
    assert first.mail("a@example.com")[0] == 250
    assert second.mail("a@example.com")[0] == 421  # the first one's message may still come
    assert first.rset()[0] == 250
    third = client(sim)
    assert third.mail("a@example.com")[0] == 250  # the reset gave its place back
    first.quit()
    third.quit()


def test_13_sim_refuses_past_the_message_quota_with_554(sim_factory):
    sim = sim_factory(quota=2)
    smtp = client(sim)
    for _ in range(2):
        smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        554, b"5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    assert smtp.noop()[0] == 250  # the connection stays open
    smtp.quit()
    assert len(sim.messages) == 2
    assert sim.refusals == [("mail", "554 5.2.0 STOREDRV.Submission.Exception:"
                                     "SubmissionQuotaExceededException")]


def test_13_sim_quota_of_recipients_refuses_at_end_of_data(sim_factory):
    sim = sim_factory(quota=3, quota_counts="recipients", quota_reply="550 5.4.5 Daily user sending limit exceeded")
    smtp = client(sim)
    smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], MESSAGE)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], MESSAGE)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.4.5 Daily user sending limit exceeded")
    smtp.sendmail("a@example.com", ["d@example.com"], MESSAGE)
    assert smtp.mail("a@example.com")[0] == 550
    smtp.quit()
    assert [rcpts for _, rcpts, _ in sim.messages] == [["b@example.com", "c@example.com"], ["d@example.com"]]
    assert [stage for stage, _ in sim.refusals] == ["data", "mail"]


def test_13_sim_answers_a_pipelined_transaction_in_order(sim_factory):
    sim = sim_factory()
    with Talk(sim.port) as t:
        assert t.reply().startswith("220 ")
        ehlo = t.cmd("EHLO client.test")
        assert "250-PIPELINING" in ehlo and "SIZE" in ehlo and "8BITMIME" in ehlo
        t.send(b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.com>\r\n"
               b"RCPT TO:<c@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in t.replies(4)] == ["250", "250", "250", "354"]
        # The body, a stuffed dot line, the end, and the next transaction, in one write.
        t.send(b"Subject: one\r\n\r\n..leading dot\r\n.\r\nRSET\r\nMAIL FROM:<>\r\n"
               b"RCPT TO:<d@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in t.replies(5)] == ["250", "250", "250", "250", "354"]
        t.send(b".\r\nQUIT\r\n")
        assert [r[:3] for r in t.replies(2)] == ["250", "221"]
    assert sim.messages == [
        ("a@example.com", ["b@example.com", "c@example.com"], b"Subject: one\r\n\r\n.leading dot\r\n"),
        ("", ["d@example.com"], b""),
    ]


def test_13_sim_holds_each_message_before_the_final_reply(sim_factory):
    sim = sim_factory(hold=0.2)
    smtp = client(sim)
    started = time.monotonic()
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    assert time.monotonic() - started >= 0.2
    smtp.quit()


def test_13_sim_stop_during_a_hold_does_not_wait_for_it(sim_factory):
    sim = UpstreamSim(hold=30).start()
    outcome = []

    def send():
        try:
            with smtplib.SMTP(sim.host, sim.port, timeout=10) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        except (OSError, smtplib.SMTPException) as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    assert sim.wait_for(lambda: sim.holding == 1)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 5
    sender.join(10)
    assert sim.messages == [] and len(outcome) == 1


def test_13_sim_stop_leaves_no_threads_or_sockets():
    before = set(threading.enumerate())
    sim = UpstreamSim().start()
    idle = socket.create_connection((sim.host, sim.port), timeout=5)
    assert idle.recv(512).startswith(b"220 ")
    busy = client(sim)
    assert sim.wait_for(lambda: sim.open_now == 2)
    sim.stop()
    assert set(threading.enumerate()) - before == set()
    assert idle.recv(512) == b""  # the simulator closed it
    with pytest.raises(smtplib.SMTPServerDisconnected):
        busy.noop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((sim.host, sim.port), timeout=5)
    idle.close()
    busy.close()
    assert sim.open_now == 0 and sim.errors == []


def test_13_sim_auth_plain_and_login_with_given_credentials(sim_factory):
    sim = sim_factory(auth=("user@example.com", "secret"))
    smtp = client(sim)
    assert smtp.has_extn("auth") and "PLAIN" in smtp.esmtp_features["auth"]
    assert smtp.mail("a@example.com")[0] == 530
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        smtp.login("user@example.com", "wrong")
    assert refused.value.smtp_code == 535
    smtp.login("user@example.com", "secret")  # smtplib picks PLAIN
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    smtp.quit()
    smtp = client(sim)
    smtp.user, smtp.password = "user@example.com", "secret"
    assert smtp.auth("LOGIN", smtp.auth_login)[0] == 235
    smtp.quit()
    assert sim.logins == ["user@example.com", "user@example.com"]


def test_13_sim_auth_true_accepts_any_credentials(sim_factory):
    sim = sim_factory(auth=True)
    smtp = client(sim)
    smtp.login("anyone", "anything")
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    smtp.quit()
    assert sim.logins == ["anyone"]


def test_13_sim_starttls_then_auth(sim_factory, certs):
    sim = sim_factory(tls=certs.server_context(), auth=True)
    smtp = smtplib.SMTP("localhost", sim.port, timeout=5)
    smtp.ehlo("client.test")
    assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
    smtp.starttls(context=certs.client_context())
    smtp.ehlo("client.test")
    assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
    smtp.login("user", "pass")
    smtp.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    smtp.quit()
    assert len(sim.messages) == 1


def test_13_sim_overlong_line_is_refused_and_the_session_goes_on(sim_factory):
    sim = sim_factory()
    with Talk(sim.port, ehlo="client.test") as t:
        t.send(b"NOOP " + b"x" * 10000 + b"\r\n")
        assert t.reply().startswith("500 5.5.2")
        assert t.cmd("NOOP").startswith("250")


def test_13_sim_closes_a_silent_client_after_its_timeout(sim_factory):
    sim = sim_factory(timeout=0.2)
    with Talk(sim.port) as t:
        assert t.reply().startswith("220 ")
        assert sim.wait_for(lambda: sim.open_now == 0)
        assert t.reply().startswith("421 4.4.2")


def test_13_sim_wait_for_gives_false_on_timeout(sim_factory):
    sim = sim_factory()
    assert sim.wait_for(lambda: sim.messages, timeout=0.05) is False
