"""Remotes: the SPEC 5.1 URL grammar, routing by recipient, and sending.

Owns `Remote` (whose repr never shows the password) and everything that talks
to an upstream server or writes the `file:` outbox. Must not know about the
client session: it takes an envelope and bytes and raises on failure.
"""

import re
import os
from dataclasses import dataclass, field
from typing import Optional, Pattern, Tuple
from urllib.parse import unquote, urlsplit, parse_qsl

DEFAULT_PORTS = {"smtp": 25, "starttls": 587, "tls": 465, "smtps": 465}
AUTH_METHODS = ("plain", "login")


@dataclass(frozen=True)
class Remote:
    """One upstream destination parsed from a remote URL."""

    scheme: str
    host: str = ""
    port: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    sender: Optional[str] = None
    auth: str = "plain"
    skip_verify: bool = False
    recipient: Optional[Pattern] = None
    path: Optional[str] = None

    @property
    def implicit_tls(self) -> bool:
        return self.scheme in ("tls", "smtps")

    def masked(self) -> str:
        """The URL with the password replaced by `***`, safe to log."""
        if self.scheme == "file":
            return "file:%s" % self.path
        host = "[%s]" % self.host if ":" in self.host else self.host
        cred = ""
        if self.username is not None:
            cred = self.username + (":***" if self.password is not None else "") + "@"
        return "%s://%s%s:%d%s" % (self.scheme, cred, host, self.port,
                                   "/" + self.sender if self.sender else "")

    def admits(self, rcpt: str) -> bool:
        """True when the `recipient=` filter takes this address (SPEC 5.2)."""
        return self.recipient is None or self.recipient.fullmatch(rcpt) is not None

    def __str__(self) -> str:
        return self.masked()


def parse_remote(url: str, base_dir: str = ".") -> Remote:
    """Parse one remote URL of SPEC 5.1.

    Raises:
        ValueError: with a reason that never contains the password.
    """
    if url.startswith("file:"):
        path = url[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("file: needs a folder path")
        return Remote(scheme="file", path=os.path.normpath(os.path.join(base_dir, path)))
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError("%r is not a URL (scheme://host[:port])" % _mask_raw(url))
    if scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("unknown scheme %r (use smtp, starttls, tls, smtps or file:)" % scheme)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError("%s: %s" % (_mask_raw(url), _no_secret(str(exc), url)))
    if not parts.hostname:
        raise ValueError("%s: missing host" % _mask_raw(url))
    scheme = scheme.lower()
    params = _parse_params(parts.query, url)
    auth = params.pop("auth", "plain").lower()
    if auth not in AUTH_METHODS:
        raise ValueError("%s: unknown auth=%s (use plain or login)" % (_mask_raw(url), auth))
    skip = params.pop("skipverify", "false").lower()
    if skip not in ("", "true", "1", "false", "0"):
        raise ValueError("%s: skipVerify takes true or false" % _mask_raw(url))
    recipient = None
    if "recipient" in params:
        pattern = params.pop("recipient")
        try:
            recipient = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError("%s: recipient=%s is not a valid regex: %s" % (_mask_raw(url), pattern, exc))
    if params:
        raise ValueError("%s: unknown parameter %s" % (_mask_raw(url), ", ".join(sorted(params))))
    sender = unquote(parts.path.lstrip("/")) or None
    return Remote(
        scheme=scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        sender=sender,
        auth=auth,
        skip_verify=skip in ("", "true", "1"),
        recipient=recipient,
    )


def _parse_params(query: str, url: str) -> dict:
    params = {}
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        params[key.lower()] = unquote(value)
    return params


_USERINFO = re.compile(r"(://[^:/@]*:)[^@/]*@")


def _mask_raw(url: str) -> str:
    """Mask the password in a URL that may not parse (for error messages)."""
    return _USERINFO.sub(r"\1***@", url)


def _no_secret(text: str, url: str) -> str:
    m = re.search(r"://[^:/@]*:([^@/]*)@", url)
    return text.replace(m.group(1), "***") if m and m.group(1) else text


def route(remotes: Tuple[Remote, ...], sender: str, rcpts, strict_sender: bool):
    """Pair each taking-part remote with the recipients it admits (SPEC 5.2)."""
    plan = []
    for remote in remotes:
        if strict_sender and (remote.sender or "").lower() != sender.lower():
            continue
        mine = [r for r in rcpts if remote.admits(r)]
        if mine:
            plan.append((remote, mine))
    return plan
