"""SPEC 10: OAuth 2.0 (XOAUTH2) to remotes, against a real token endpoint
(http.server) and a real aiosmtpd upstream with AUTH XOAUTH2, both on loopback;
and `-test-remotes` against good and bad remotes of every scheme and auth method.
"""

import base64
import logging
import smtplib
import threading
import time

import pytest

from conftest import free_port, wait_until
from delivery_kit import deliver_once, settings_for
from oauth_kit import (AADSTS_ERROR, CLIENT_ID, CLIENT_SECRET, MAILBOX, REFRESH_TOKEN, TENANT,
                       endpoint, oauth_options, upstream_factory)  # noqa: F401 (fixtures)
from relay_lib import cli, metrics
from relay_lib.config import settings as config

FORWARD_TEMPFAIL = "451 4.4.1 Forwarding failed, try again later"
MESSAGE = b"From: scanner@contoso.test\r\nTo: b@example.org\r\nSubject: scan\r\n\r\nscan.pdf\r\n"


@pytest.fixture
def trust_test_ca(certs, monkeypatch):
    """Make the test CA the system trust store (OpenSSL honours SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca_path)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def send(relay, count=1):
    """`count` messages over one smtplib connection to the relay."""
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        for _ in range(count):
            client.sendmail("scanner@contoso.test", ["b@example.org"], MESSAGE)


def refused(relay):
    """The relay's reply to one message, as 'code enhanced text', when it refuses it."""
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("scanner@contoso.test", ["b@example.org"], MESSAGE)
    return "%d %s" % (info.value.smtp_code, info.value.smtp_error.decode())


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "smtprelay" and r.levelno == logging.WARNING]


# -- the token, its cache and its renewal --------------------------------------

def test_10_first_message_fetches_one_token_with_client_credentials(relay_factory, endpoint,
                                                                    upstream_factory):
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), **oauth_options(endpoint))
    fetched = metrics.OAUTH_FETCHES.labels("ok").value()
    send(relay)
    assert endpoint.requests == 1
    assert metrics.OAUTH_FETCHES.labels("ok").value() - fetched == 1  # SPEC 12
    assert endpoint.forms[0] == {"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                 "client_secret": CLIENT_SECRET,
                                 "scope": "https://outlook.office365.com/.default"}
    assert len(up.box) == 1 and up.box[0].content.endswith(MESSAGE)
    assert up.handler.xoauth2 == [(MAILBOX, True)]


def test_10_fifty_messages_from_ten_clients_share_one_token_and_pooled_connections(
        relay_factory, endpoint, upstream_factory):
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), **oauth_options(endpoint))
    errors = []

    def client():
        try:
            send(relay, 5)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(up.box) == 50
    assert endpoint.requests == 1
    # A pooled connection stays authenticated: fewer AUTHs than messages.
    assert 1 <= len(up.handler.xoauth2) <= 10
    assert all(ok for _, ok in up.handler.xoauth2)


def test_10_expiry_triggers_exactly_one_renewal(relay_factory, endpoint, upstream_factory):
    endpoint.lifetime = 1  # renewed at half its life: 0.5 s
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), remote_pool_size=0, **oauth_options(endpoint))
    send(relay)
    assert endpoint.requests == 1
    tokens = relay.delivery.dispatcher.tokens
    first = tokens.current
    assert wait_until(lambda: time.monotonic() >= first.renew_at, timeout=3)
    threads = [threading.Thread(target=send, args=(relay, 2)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(up.box) == 9
    assert endpoint.requests == 2
    assert tokens.current is not first


def test_10_revoked_token_535_is_renewed_and_the_message_goes_through(relay_factory, endpoint,
                                                                      upstream_factory):
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), remote_pool_size=0, **oauth_options(endpoint))
    send(relay)
    endpoint.revoke_all()
    send(relay)
    assert len(up.box) == 2
    assert endpoint.requests == 2
    assert [ok for _, ok in up.handler.xoauth2] == [True, False, True]
    assert up.handler.error_handshakes == 1  # 334 with an error, answered by an empty line


def test_10_fresh_token_refused_is_not_retried(tmp_path, endpoint, upstream_factory, relay_log):
    up = upstream_factory(mailboxes=())  # SMTP AUTH disabled for this mailbox
    reply, _ = deliver_once(tmp_path, remotes=up.url(), **oauth_options(endpoint))
    assert str(reply) == FORWARD_TEMPFAIL
    assert endpoint.requests == 1
    assert len(up.handler.xoauth2) == 1
    (warning,) = warnings_of(relay_log)
    assert "AUTH XOAUTH2 refused: 535 5.7.139" in warning.fields["error"]


@pytest.mark.parametrize("mode, expected", [
    ("down", "token endpoint unreachable"),
    ("slow", "token endpoint timed out after 0.5s"),
    ("aadsts", "token endpoint answered HTTP 400: invalid_client: AADSTS7000215: Invalid client secret"),
    ("not_json", "token endpoint answered HTTP 200, not JSON"),
    ("not_http", "token endpoint answered no HTTP: BadStatusLine: 220 sink.test"),
], ids=["down", "slow", "400-aadsts", "not-json", "not-http"])
def test_10_token_endpoint_failure_is_451_with_a_warning_naming_the_error(
        relay_factory, endpoint, upstream_factory, sink, relay_log, mode, expected):
    up = upstream_factory()
    options = oauth_options(endpoint, remote_timeout="500ms")
    if mode == "down":
        options["oauth_token_url"] = "http://127.0.0.1:%d/token" % free_port()
    elif mode == "not_http":
        options["oauth_token_url"] = "http://127.0.0.1:%d/token" % sink.port  # an SMTP server
    else:
        endpoint.mode = mode
    relay = relay_factory(remotes=up.url(), **options)
    failed = metrics.OAUTH_FETCHES.labels("failed").value()
    assert refused(relay) == FORWARD_TEMPFAIL
    assert metrics.OAUTH_FETCHES.labels("failed").value() - failed == 1  # SPEC 12
    assert up.box == [] and up.handler.xoauth2 == []
    (warning,) = warnings_of(relay_log)
    assert expected in warning.fields["error"]
    assert CLIENT_SECRET not in warning.fields["error"]


def test_10_failed_early_renewal_keeps_a_token_that_is_still_valid(relay_factory, endpoint,
                                                                  upstream_factory, relay_log):
    endpoint.lifetime = 3  # renewed after 1.5 s, valid for 3 s
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), remote_pool_size=0, **oauth_options(endpoint))
    send(relay)
    first = relay.delivery.dispatcher.tokens.current
    assert wait_until(lambda: time.monotonic() >= first.renew_at, timeout=3)
    endpoint.mode = "aadsts"
    send(relay)
    assert len(up.box) == 2 and endpoint.requests == 2
    assert [ok for _, ok in up.handler.xoauth2] == [True, True]
    (warning,) = warnings_of(relay_log)
    assert warning.getMessage() == "oauth renewal failed, current token kept"
    assert "AADSTS7000215" in warning.fields["error"]


@pytest.mark.parametrize("delay, timeout, expected", [
    (0.3, 2.0, "the token"),
    (5.0, 0.5, "token endpoint timed out after 0.5s"),
], ids=["answer", "timeout"])
def test_10_one_request_in_flight_the_waiting_threads_share_its_outcome(endpoint, delay, timeout,
                                                                         expected):
    from relay_lib.outbound.oauth import TokenError, TokenSource

    endpoint.mode, endpoint.delay = "slow", delay
    source = TokenSource(endpoint.url, CLIENT_ID, CLIENT_SECRET, "s", None, timeout=timeout)
    outcomes = []

    def get():
        try:
            token, _ = source.get()
            outcomes.append("the token" if token.access_token == endpoint.issued[0] else "another")
        except TokenError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=get) for _ in range(5)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes == [expected] * 5
    assert endpoint.requests == 1
    assert time.monotonic() - started < 2.0


def test_10_refresh_token_grant_keeps_the_rotated_refresh_token(relay_factory, endpoint,
                                                                 upstream_factory):
    endpoint.lifetime = 1
    endpoint.rotate = True
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), remote_pool_size=0,
                          oauth_token_url=endpoint.url, oauth_client_id=CLIENT_ID,
                          oauth_client_secret=CLIENT_SECRET, oauth_refresh_token=REFRESH_TOKEN)
    send(relay)
    first = relay.delivery.dispatcher.tokens.current
    assert wait_until(lambda: time.monotonic() >= first.renew_at, timeout=3)
    send(relay)
    assert len(up.box) == 2
    assert [f["refresh_token"] for f in endpoint.forms] == endpoint.refresh_tokens[:2]
    assert endpoint.forms[0] == {"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                 "client_secret": CLIENT_SECRET, "refresh_token": REFRESH_TOKEN}


def test_10_no_secret_refresh_token_or_access_token_in_any_log_line(relay_factory, endpoint,
                                                                    upstream_factory, relay_log):
    endpoint.lifetime = 1
    endpoint.rotate = True
    up = upstream_factory()
    relay = relay_factory(remotes=up.url(), remote_pool_size=0, log_level="trace",
                          oauth_token_url=endpoint.url, oauth_client_id=CLIENT_ID,
                          oauth_client_secret=CLIENT_SECRET, oauth_refresh_token=REFRESH_TOKEN)
    send(relay)
    endpoint.revoke_all()  # a 535, a renewal, a retry
    send(relay)
    endpoint.mode = "aadsts"
    first = relay.delivery.dispatcher.tokens.current
    assert wait_until(lambda: time.monotonic() >= first.expires_at, timeout=3)
    assert refused(relay) == FORWARD_TEMPFAIL
    assert len(up.box) == 2 and endpoint.requests == 3
    ours = [r for r in relay_log.records if r.name.startswith("smtprelay")]
    assert any(r.levelno == logging.DEBUG and r.getMessage() == "oauth token" for r in ours)
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in ours)
    secrets = [CLIENT_SECRET] + endpoint.refresh_tokens + endpoint.issued
    secrets += [base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (MAILBOX, t)).encode()).decode()
                for t in endpoint.issued]
    assert len(endpoint.issued) == 2
    for secret in secrets:
        assert secret not in text


def test_10_check_masks_the_client_secret_and_refresh_token(tmp_path, endpoint):
    settings = settings_for(tmp_path, remotes="starttls://a%40b.test@mail.test?auth=xoauth2",
                            oauth_refresh_token=REFRESH_TOKEN, **oauth_options(endpoint))
    text = "\n".join(config.describe(settings))
    assert "oauth_client_secret = ***" in text and "oauth_refresh_token = ***" in text
    assert CLIENT_SECRET not in text and REFRESH_TOKEN not in text
    assert CLIENT_SECRET not in repr(settings) and REFRESH_TOKEN not in repr(settings)


# -- configuration errors ------------------------------------------------------

@pytest.mark.parametrize("options, option, reason", [
    ({"remotes": "starttls://a%40b.test:pw@mail.test?auth=xoauth2"}, "remotes",
     "auth=xoauth2 takes the mailbox as user and no password"),
    ({"remotes": "starttls://mail.test?auth=xoauth2"}, "remotes",
     "auth=xoauth2 takes the mailbox as user and no password"),
    ({"oauth_token_url": ""}, "oauth_token_url", "needs this option"),
    ({"oauth_client_id": ""}, "oauth_client_id", "needs this option"),
    ({"oauth_client_secret": ""}, "oauth_client_secret", "client credentials grant needs it"),
    ({"oauth_token_url": "http://login.example.com/token"}, "oauth_token_url", "use https"),
    ({"oauth_token_url": "ftp://login.example.com/token"}, "oauth_token_url", "not an http(s) URL"),
], ids=["password", "no-user", "no-token-url", "no-client-id", "no-secret", "http-remote", "ftp"])
def test_10_config_errors_name_the_option(tmp_path, options, option, reason):
    merged = {"remotes": "starttls://a%40b.test@mail.test?auth=xoauth2", "oauth_token_url":
              "https://login.microsoftonline.com/%s/oauth2/v2.0/token" % TENANT,
              "oauth_client_id": CLIENT_ID, "oauth_client_secret": CLIENT_SECRET}
    merged.update(options)
    with pytest.raises(config.ConfigError) as info:
        settings_for(tmp_path, **merged)
    assert info.value.option == option and reason in info.value.reason
    assert "pw@" not in str(info.value) and CLIENT_SECRET not in str(info.value)


def test_10_http_token_url_is_allowed_to_loopback_and_refresh_grant_needs_no_secret(tmp_path, endpoint):
    settings = settings_for(tmp_path, remotes="starttls://a%40b.test@mail.test?auth=xoauth2",
                            oauth_token_url=endpoint.url, oauth_client_id=CLIENT_ID,
                            oauth_refresh_token=REFRESH_TOKEN)
    assert settings.oauth_token_url == endpoint.url and settings.oauth_client_secret is None


# -- -test-remotes -------------------------------------------------------------

def run_test_remotes(tmp_path, capsys, remotes, **options):
    """Run `relay.py -test-remotes FILE`; returns (exit status, {masked url: line})."""
    ini = tmp_path / "probe.ini"
    lines = ["hostname = relay.test", "remote_timeout = 2s", "remotes = %s" % " ".join(remotes)]
    lines += ["%s = %s" % item for item in options.items()]
    ini.write_text("\n".join(lines) + "\n")
    status = cli.main(["-test-remotes", str(ini)])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(remotes)
    return status, out


def test_10_test_remotes_all_good_exits_0_and_shows_token_claims(tmp_path, capsys, endpoint,
                                                                 upstream_factory, trust_test_ca):
    users = {"app": "pw-app-1"}
    plain, starttls, tls = (upstream_factory(m, users=users) for m in ("plain", "starttls", "tls"))
    remotes = [plain.url(user="", query=""), plain.url(),
               starttls.url("starttls", user="app", password="pw-app-1", query=""), starttls.url("starttls"),
               tls.url("tls", user="app", password="pw-app-1", query="auth=login"), tls.url("tls"),
               "file:outbox"]
    status, out = run_test_remotes(tmp_path, capsys, remotes, **oauth_options(endpoint))
    assert status == 0
    assert all(line.startswith("ok   ") for line in out), out
    assert out[-1] == "ok   file:%s: writable folder" % (tmp_path / "outbox")
    xoauth2 = [out[i] for i in (1, 3, 5)]
    for line in xoauth2:
        assert ": ok (token lifetime 3600s, aud=https://outlook.office.com, roles=SMTP.SendAsApp, " \
               "tid=%s)" % TENANT in line
    for token in endpoint.issued:
        assert token not in "\n".join(out)
    assert endpoint.requests == 1
    assert up_mechanisms(plain, starttls, tls) == [[], ["XOAUTH2"], ["PLAIN"], ["XOAUTH2"],
                                                    ["LOGIN"], ["XOAUTH2"]]
    assert plain.box == starttls.box == tls.box == []  # no mail is sent


def up_mechanisms(plain, starttls, tls):
    """AUTH mechanisms each probe used, in the order the remotes were listed."""
    seen = [[], list(plain.handler.mechanisms)]
    for up in (starttls, tls):
        seen += [[m] for m in up.handler.mechanisms]
    return seen


def test_10_test_remotes_bad_ones_name_the_failed_step_and_exit_1(tmp_path, capsys, endpoint,
                                                                  upstream_factory, sink_factory,
                                                                  trust_test_ca):
    users = {"app": "pw-app-1"}
    plain, starttls, tls = (upstream_factory(m, users=users) for m in ("plain", "starttls", "tls"))
    no_tls = sink_factory()
    (tmp_path / "a-file").write_text("x")
    remotes = [
        "smtp://127.0.0.1:%d" % free_port(),
        "starttls://127.0.0.1:%d" % no_tls.port,
        "tls://127.0.0.1:%d" % no_tls.port,
        starttls.url("starttls", user="app", password="wrong", query=""),
        tls.url("tls", user="app", password="wrong", query="auth=login"),
        plain.url(user="nobody@contoso.test"),
        "file:a-file",
    ]
    status, out = run_test_remotes(tmp_path, capsys, remotes, **oauth_options(endpoint))
    assert status == 1
    assert all(line.startswith("FAIL ") for line in out), out
    assert out[0].endswith(": connect: Connection refused")
    assert out[1].endswith(": STARTTLS required but not offered") and ": EHLO: " in out[1]
    assert ": TLS connect: " in out[2]
    assert out[3].endswith(": AUTH: AUTH PLAIN refused: 535 5.7.8 Authentication credentials invalid")
    assert "wrong" not in out[3] and "app:***@" in out[3]
    assert out[4].endswith(": AUTH: AUTH LOGIN refused: 535 5.7.8 Authentication credentials invalid")
    assert ": AUTH: AUTH XOAUTH2 refused: 535 5.7.139 Authentication unsuccessful, " \
           "SmtpClientAuthentication is disabled for the Mailbox (token lifetime 3600s" in out[5]
    assert ": folder: " in out[6]


def test_10_test_remotes_token_failure_is_the_token_step(tmp_path, capsys, endpoint, upstream_factory):
    endpoint.mode = "aadsts"
    up = upstream_factory()
    status, out = run_test_remotes(tmp_path, capsys, [up.url()], **oauth_options(endpoint))
    assert status == 1
    assert out == ["FAIL %s: token: token endpoint answered HTTP 400: invalid_client: %s"
                   % (up.url().replace("%40", "@").replace("?auth=xoauth2", ""),
                      AADSTS_ERROR["error_description"])]
    assert up.handler.connections == set()  # no connection without a token
