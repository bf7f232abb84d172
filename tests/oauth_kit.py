"""Fixtures for the OAuth tests (this module has no tests): a real token
endpoint on loopback and a real aiosmtpd upstream that implements AUTH XOAUTH2.

`TokenEndpoint` issues short-lived JWT-shaped tokens, counts requests and can
fail in each way SPEC 10 names; `XOAuthUpstream` accepts only tokens the
endpoint issued and has not revoked, with the 334-error handshake on refusal.
"""

import base64
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from conftest import _Controller, _Recorder, free_port, stopped_at_teardown

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "Xy8Q~s3cr3t-client-value"
REFRESH_TOKEN = "1//0refresh-token-original"
MAILBOX = "scanner@contoso.test"
TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
AADSTS_ERROR = {
    "error": "invalid_client",
    "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being "
                         "sent in the request is the client secret value, not the client secret ID.",
    "error_codes": [7000215],
}


def _b64url(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


class TokenEndpoint:
    """A token endpoint on 127.0.0.1 (http, allowed for loopback only).

    `mode`: "ok", "slow" (answers after `delay` seconds), "aadsts" (400 with
    AADSTS_ERROR), "not_json" (200 with an HTML page). `lifetime` is the
    expires_in it gives; `rotate` issues a new refresh token with each answer
    and accepts only the latest. `forms` keeps every request's form; `issued`
    every access token; `valid` those not revoked; `refresh_tokens` every
    refresh token it handed out.
    """

    def __init__(self):
        self.mode = "ok"
        self.delay = 5.0
        self.lifetime = 3600
        self.rotate = False
        self.forms = []
        self.issued = []
        self.valid = set()
        self.refresh_tokens = [REFRESH_TOKEN]
        self.lock = threading.Lock()
        self.release = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                status, body = endpoint.answer(form)
                if endpoint.mode == "slow":
                    endpoint.release.wait(endpoint.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body.startswith(b"{")
                                 else "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/tenant/oauth2/v2.0/token" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.forms)

    def answer(self, form):
        with self.lock:
            self.forms.append(form)
            if self.mode == "aadsts":
                return 400, json.dumps(AADSTS_ERROR).encode()
            if self.mode == "not_json":
                return 200, b"<html><body>Sign in to your account</body></html>"
            if form.get("grant_type") == "refresh_token" and form.get("refresh_token") != self.refresh_tokens[-1]:
                return 400, json.dumps({"error": "invalid_grant",
                                        "error_description": "Token has been expired or revoked."}).encode()
            token = ".".join([_b64url({"alg": "RS256", "typ": "JWT"}),
                              _b64url({"aud": "https://outlook.office.com", "roles": ["SMTP.SendAsApp"],
                                       "tid": TENANT, "jti": len(self.issued)}),
                              "c2lnbmF0dXJl%d" % len(self.issued)])
            self.issued.append(token)
            self.valid.add(token)
            answer = {"token_type": "Bearer", "expires_in": self.lifetime, "access_token": token}
            if self.rotate:
                self.refresh_tokens.append("1//0refresh-token-rotated-%d" % len(self.refresh_tokens))
                answer["refresh_token"] = self.refresh_tokens[-1]
            return 200, json.dumps(answer).encode()

    def revoke_all(self):
        with self.lock:
            self.valid.clear()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _XOAuthRecorder(_Recorder):
    """The recording handler plus AUTH XOAUTH2 against the endpoint's valid tokens."""

    def __init__(self, endpoint, mailboxes):
        super().__init__(pipelining=True)
        self.endpoint = endpoint
        self.mailboxes = mailboxes
        self.xoauth2 = []  # (user, accepted) per attempt
        self.error_handshakes = 0

    async def auth_XOAUTH2(self, server, args):
        self.mechanisms.append("XOAUTH2")
        if len(args) < 2:
            return AuthResult(success=False, handled=False, message="501 5.5.2 initial response required")
        raw = base64.b64decode(args[1]).decode()
        fields = dict(part.split("=", 1) for part in raw.split("\x01") if part)
        user, bearer = fields.get("user"), fields.get("auth", "")
        ok = (raw.endswith("\x01\x01") and bearer.startswith("Bearer ")
              and bearer[len("Bearer "):] in self.endpoint.valid)
        self.xoauth2.append((user, ok and user in self.mailboxes))
        if not ok:
            # As Gmail: 334 with the error as base64 JSON, then the final reply.
            answer = await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
            if answer == b"":
                self.error_handshakes += 1
            return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")
        if user not in self.mailboxes:
            return AuthResult(success=False, handled=False, message="535 5.7.139 Authentication unsuccessful, "
                                                     "SmtpClientAuthentication is disabled for the Mailbox")
        return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))


class XOAuthUpstream:
    """An aiosmtpd upstream with AUTH XOAUTH2 (and PLAIN/LOGIN for `users`).

    `mode`: plain (AUTH offered without TLS, as on loopback), starttls or tls.
    """

    def __init__(self, endpoint, context=None, mode="plain", mailboxes=(MAILBOX,), users=None):
        self.host, self.port = "127.0.0.1", free_port()
        self.handler = _XOAuthRecorder(endpoint, set(mailboxes))
        users = users or {}

        def authenticator(server, session, envelope, mechanism, data):
            self.handler.mechanisms.append(mechanism)
            ok = isinstance(data, LoginPassword) and users.get(data.login.decode()) == data.password.decode()
            return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

        kwargs = {"authenticator": authenticator, "auth_require_tls": False}
        if mode == "starttls":
            kwargs.update(tls_context=context)
        self.controller = _Controller(self.handler, self.host, self.port,
                                      context if mode == "tls" else None, kwargs)
        self.controller.start()

    @property
    def box(self):
        return self.handler.box

    def url(self, scheme="smtp", user=MAILBOX, password=None, query="auth=xoauth2"):
        userinfo = urllib.parse.quote(user, safe="") if user else ""
        if password is not None:
            userinfo += ":" + urllib.parse.quote(password, safe="")
        userinfo += "@" if userinfo else ""
        return "%s://%s%s:%d%s" % (scheme, userinfo, self.host, self.port, "?" + query if query else "")

    def stop(self):
        if self.controller._thread is not None:
            self.controller.stop()


@pytest.fixture
def endpoint():
    e = TokenEndpoint()
    yield e
    e.stop()


@pytest.fixture
def upstream_factory(endpoint, certs):
    """XOAuthUpstream(endpoint, ...) servers, stopped at teardown; TLS modes use the test CA."""
    def start(mode="plain", **kw):
        return XOAuthUpstream(endpoint, certs.server_context() if mode != "plain" else None, mode, **kw)

    yield from stopped_at_teardown(start)


def oauth_options(endpoint, **more):
    """The ini options of a client credentials setup against `endpoint`."""
    options = {"oauth_token_url": endpoint.url, "oauth_client_id": CLIENT_ID,
               "oauth_client_secret": CLIENT_SECRET}
    options.update(more)
    return options
