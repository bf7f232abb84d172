"""OAuth 2.0 tokens for `auth=xoauth2` remotes (SPEC 10): the client
credentials and refresh token grants over urllib, the shared in-memory cache
with early renewal, the XOAUTH2 SASL string and JWT claims for -test-remotes.

Owns every access token, refresh token and client secret. Must not speak
SMTP, and must never put a secret or a token into an error or a log line.
"""

import base64
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Optional, Tuple

from relay_lib import metrics
from relay_lib.config.settings import DEFAULT_SCOPE
from relay_lib.deadline import Deadline
from relay_lib.logs import fields, log
from relay_lib.netaddr import is_loopback

RENEW_BEFORE = 300.0  # SPEC 10: renew 5 minutes before expires_in ...
DEFAULT_LIFETIME = 3600  # expires_in is only RECOMMENDED [R6749 5.1]; an hour is what both big providers give
MAX_LIFETIME = 86400  # a longer expires_in counts as a day: renewed at half of it, never unbounded
MAX_ANSWER = 64 * 1024  # a token answer is a few KB; more is not a token endpoint
DESCRIPTION_MAX = 300  # characters of error_description kept in an error


class TokenError(OSError):
    """No token: the endpoint is unreachable, slow, refused or answered nonsense.

    An OSError like every other network failure on the way to a remote, so
    the caller treats it as temporary. Its text never holds a secret.
    """


def xoauth2_response(user: str, access_token: str) -> str:
    """The base64 initial response of AUTH XOAUTH2 (SPEC 10)."""
    raw = "user=%s\x01auth=Bearer %s\x01\x01" % (user, access_token)
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


class Token:
    """One access token and when to renew it; its repr hides the token."""

    __slots__ = ("access_token", "expires_in", "renew_at", "expires_at")

    def __init__(self, access_token: str, expires_in: int, obtained: float):
        self.access_token = access_token
        self.expires_in = expires_in
        self.expires_at = obtained + expires_in
        # SPEC 10: 5 minutes before expiry, or at half its life when that is sooner.
        self.renew_at = obtained + max(expires_in - RENEW_BEFORE, expires_in / 2)

    def xoauth2(self, user: str) -> str:
        """The AUTH XOAUTH2 initial response for mailbox `user`."""
        return xoauth2_response(user, self.access_token)

    def claims(self) -> Dict[str, object]:
        """The payload of a JWT access token, decoded without verification; {} otherwise."""
        parts = self.access_token.split(".")
        if len(parts) != 3:
            return {}
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
            return {}
        return payload if isinstance(payload, dict) else {}

    def describe(self) -> str:
        """Lifetime and, for a JWT, audience, roles or scopes and tenant; never the token."""
        parts = ["token lifetime %ds" % self.expires_in]
        claims = self.claims()
        for name in ("aud", "roles", "scp", "tid"):
            value = claims.get(name)
            if value is not None:
                parts.append("%s=%s" % (name, " ".join(map(str, value)) if isinstance(value, list) else value))
        return ", ".join(parts)

    def __repr__(self) -> str:
        return "Token(***, expires_in=%d)" % self.expires_in


class TokenSource:
    """Gets, caches and renews the one access token shared by every connection.

    Thread-safe: while a request is in flight the other callers wait for it
    and share its token or its error. A refresh token the server rotates
    replaces the old one in memory (it is not written back to the ini).
    """

    def __init__(self, url: str, client_id: str, client_secret: Optional[str], scope: str,
                 refresh_token: Optional[str], timeout: float):
        self.url = url
        self.client_id = client_id
        self.scope = scope
        self.timeout = timeout
        self._secret = client_secret or ""
        self._refresh_token = refresh_token or ""
        self._token: Optional[Token] = None
        self._error: Optional[TokenError] = None
        self._busy = False
        self._cond = threading.Condition()
        self._handlers = []
        if is_loopback(urllib.parse.urlsplit(url).hostname or ""):
            self._handlers.append(urllib.request.ProxyHandler({}))  # never through http_proxy

    @property
    def grant(self) -> str:
        return "refresh_token" if self._refresh_token else "client_credentials"

    @property
    def current(self) -> Optional[Token]:
        """The cached token, if any (for -test-remotes)."""
        return self._token

    def get(self) -> Tuple[Token, bool]:
        """The cached token, or a new one; returns (token, fetched by this call).

        Raises:
            TokenError: no token could be had (temporary, SPEC 10).
        """
        with self._cond:
            waited = False
            while True:
                # After waiting for someone else's request, share its outcome:
                # a new token, a current one kept, or the error.
                if self._usable() or (waited and self._token is not None):
                    return self._token, False
                if waited and self._error is not None:
                    raise self._error
                if not self._busy:
                    break
                # The request is bounded by the timeout, and so is this wait.
                if not self._cond.wait_for(lambda: not self._busy, timeout=2 * self.timeout + 1):
                    raise TokenError("token endpoint timed out after %gs" % self.timeout)
                waited = True
            self._busy = True
            current = self._token
        token, error = None, None
        try:
            token = self._request()
            metrics.OAUTH_FETCHES.labels("ok").inc()
        except TokenError as exc:
            metrics.OAUTH_FETCHES.labels("failed").inc()
            error = exc
            if current is not None and time.monotonic() < current.expires_at:
                # Renewal is early on purpose: a token with life left still serves.
                log.warning("oauth renewal failed, current token kept", extra=fields(error=str(exc)))
                token = current
        finally:
            with self._cond:
                self._busy = False
                self._token, self._error = token, error
                self._cond.notify_all()
        if token is None:
            raise error
        return token, token is not current

    def drop(self, token: Token) -> None:
        """Forget `token` (the server refused it) unless it was already replaced."""
        with self._cond:
            if self._token is token:
                self._token = None

    def _usable(self) -> bool:
        return self._token is not None and time.monotonic() < self._token.renew_at

    def _request(self) -> Token:
        """One form POST to the token endpoint [R6749 4.4, 6]."""
        form = {"grant_type": self.grant, "client_id": self.client_id}
        if self._secret:
            form["client_secret"] = self._secret
        if self._refresh_token:
            form["refresh_token"] = self._refresh_token
        if not self._refresh_token or self.scope != DEFAULT_SCOPE:
            # The refresh grant asks for a scope only when one was set: Google
            # needs none, Microsoft's delegated tokens need theirs again.
            form["scope"] = self.scope
        request = urllib.request.Request(
            self.url, data=urllib.parse.urlencode(form).encode("ascii"), method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
        # The timeout bounds the whole call, not each read: an endpoint that
        # trickles its answer must not hold every waiting sender longer.
        deadline = Deadline(self.timeout)
        opener = deadline.opener(None, *self._handlers)
        deadline.start()
        try:
            with opener.open(request, timeout=self.timeout) as answer:
                status, data = answer.status, answer.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            try:
                status, data = exc.code, exc.read(MAX_ANSWER + 1)
            except (OSError, http.client.HTTPException):
                status, data = exc.code, b""
            finally:
                exc.close()
        except (OSError, http.client.HTTPException) as exc:
            # URLError, socket.timeout, ssl errors, a reset connection, or an
            # answer that is not HTTP (http.client's errors are no OSErrors).
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, socket.timeout) or deadline.fired:
                raise self._failed("token endpoint timed out after %gs" % self.timeout) from None
            if isinstance(exc, http.client.HTTPException):
                raise self._failed("token endpoint answered no HTTP: %s: %s" % (
                    type(exc).__name__, exc)) from None
            raise self._failed("token endpoint unreachable: %s" % (reason,)) from None
        finally:
            deadline.expire()
        if deadline.fired:  # an answer cut short by the deadline may look complete
            raise self._failed("token endpoint timed out after %gs" % self.timeout)
        token = self._parse(status, data)
        log.debug("oauth token", extra=fields(grant=self.grant, expires_in=token.expires_in,
                                              url=self.url))
        return token

    def _parse(self, status: int, data: bytes) -> Token:
        try:
            answer = json.loads(data[:MAX_ANSWER].decode("utf-8"))
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self._failed("token endpoint answered HTTP %d, not JSON" % status)
        if not 200 <= status <= 299 or "error" in answer:
            # [R6749 5.2]: error and error_description, e.g. invalid_client: AADSTS7000215 ...
            description = str(answer.get("error_description") or "").split("\r\n")[0]
            raise self._failed("token endpoint answered HTTP %d: %s%s" % (
                status, answer.get("error", "no error code"),
                ": " + description[:DESCRIPTION_MAX] if description else ""))
        access_token = answer.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise self._failed("token endpoint answered without an access_token")
        if not access_token.isascii() or not access_token.isprintable() or " " in access_token:
            # [R6750 2.1] b64token; a control character would break the SASL string.
            raise self._failed("token endpoint answered an access_token that is not printable ASCII")
        expires_in = answer.get("expires_in", DEFAULT_LIFETIME)
        try:
            expires_in = int(expires_in)  # Microsoft sends a number, some servers a string
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity, 1e999
            expires_in = DEFAULT_LIFETIME
        rotated = answer.get("refresh_token")
        if self._refresh_token and isinstance(rotated, str) and rotated:
            self._refresh_token = rotated
        return Token(access_token, min(max(expires_in, 1), MAX_LIFETIME), time.monotonic())

    def _failed(self, text: str) -> TokenError:
        """A TokenError whose text, whatever the endpoint echoed, holds no secret."""
        for secret in (self._secret, self._refresh_token):
            if secret:
                text = text.replace(secret, "***")
        return TokenError(" ".join(text.split()))
