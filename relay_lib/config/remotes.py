"""Remotes: what an upstream is and who gets which recipients.

Owns `Remote` (the SPEC 5.1 URL grammar and the SPEC 13 limit parameters;
its repr never shows the password). Must not route, talk to a remote or
write a file.
"""

import functools
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Pattern, Tuple
from urllib.parse import unquote, urlsplit

from relay_lib.config.goregex import translate
from relay_lib.limits import Rate, parse_rate

DEFAULT_PORTS = {"smtp": 25, "starttls": 587, "tls": 465, "smtps": 465}
AUTH_METHODS = ("plain", "login", "xoauth2")
# skipVerify: the Go program skips verification for any value but "false".
# Those that mean "skip" in both are taken; spellings of false other than
# "false" are refused, since there they would mean the opposite.
SKIP_VERIFY_TRUE = ("", "1", "t", "true", "yes", "on")
# Remote fields that are the URL itself rather than a parameter (see parameters()).
_URL_FIELDS = ("scheme", "host", "port", "username", "password", "sender", "path")
# The limit parameters (SPEC 13): -check shows them with the effective limits
# and where each came from, not among the other parameters.
LIMIT_FIELDS = ("connections", "rate", "recipients")
_PARAM_NAMES = {"skip_verify": "skipVerify"}


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
    failover: Optional[str] = None
    # SPEC 13, as given in the URL (None when absent); the limits that apply
    # are settings.remote_limits(remote).
    connections: Optional[int] = None
    rate: Optional[Rate] = None
    recipients: Optional[Rate] = None

    @property
    def implicit_tls(self) -> bool:
        return self.scheme in ("tls", "smtps")

    @functools.cached_property  # a metrics label on every transaction
    def endpoint(self) -> str:
        """host:port ([host]:port for IPv6): names the remote without its user."""
        return "%s:%d" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)

    def masked(self) -> str:
        """The URL with the password replaced by `***`, safe to log."""
        if self.scheme == "file":
            return "file:%s" % self.path
        cred = ""
        if self.username is not None:
            cred = self.username + (":***" if self.password is not None else "") + "@"
        return "%s://%s%s%s" % (self.scheme, cred, self.endpoint, "/" + self.sender if self.sender else "")

    def admits(self, rcpt: str) -> bool:
        """True when the `recipient=` filter takes this address (SPEC 5.2)."""
        return self.recipient is None or self.recipient.fullmatch(rcpt) is not None

    def parameters(self) -> List[Tuple[str, str]]:
        """(name, value) of every setting besides the URL itself, for -check;
        a file: remote has none."""
        found: List[Tuple[str, str]] = []
        if self.scheme == "file":
            return found
        for f in fields(self):
            if f.name in _URL_FIELDS or f.name in LIMIT_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif hasattr(value, "pattern"):
                value = value.pattern
            elif value is None:
                value = "(none)"
            found.append((_PARAM_NAMES.get(f.name, f.name), str(value)))
        return found

    def __str__(self) -> str:
        return self.masked()


def parse_remote(url: str) -> Remote:
    """Parse one remote URL of SPEC 5.1; a file: path is returned as written.

    Raises:
        ValueError: with a reason that never contains the password.
    """
    if url.startswith("file:"):
        # file:outbox, file:/var/outbox, file:///var/outbox, file:///C:/outbox;
        # percent-encoding names what a space would split (file:C:/Mail%20Out).
        if "?" in url:
            raise ValueError("%s: a file: remote takes no ?parameters (write %%3F for a ? in "
                             "the folder name)" % url)
        path = unquote(url[len("file:"):])
        if path.startswith("//"):
            path = path[2:]
        if re.match(r"/[A-Za-z]:[/\\]", path):
            path = path[1:]
        if not path:
            raise ValueError("file: needs a folder path")
        return Remote(scheme="file", path=path)
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError("%r is not a URL (scheme://host[:port])" % _mask_raw(url))
    if scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("unknown scheme %r (use smtp, starttls, tls, smtps or file:)" % scheme)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # The exception text would quote the URL, password and all.
        raise ValueError("%s: invalid host or port (percent-encode @ / ? # in the user and "
                         "password)" % _mask_raw(url)) from None
    if not parts.hostname:
        raise ValueError("%s: missing host" % _mask_raw(url))
    scheme = scheme.lower()
    try:
        params = _parse_params(parts.query)
    except ValueError as exc:
        raise ValueError("%s: %s" % (_mask_raw(url), exc)) from None
    auth = params.pop("auth", "plain").lower()
    if auth not in AUTH_METHODS:
        raise ValueError("%s: unknown auth=%s (use plain, login or xoauth2)" % (_mask_raw(url), auth))
    if auth == "xoauth2" and (parts.username is None or parts.password is not None):
        # SPEC 10: the user names the mailbox; the token replaces any password.
        raise ValueError("%s: auth=xoauth2 takes the mailbox as user and no password"
                         % _mask_raw(url))
    skip = params.pop("skipverify", "false")
    if skip != "false" and skip.lower() not in SKIP_VERIFY_TRUE:
        raise ValueError("%s: skipVerify=%s is ambiguous: the Go smtprelay reads every value but "
                         "\"false\" as true; write skipVerify=true or skipVerify=false" % (_mask_raw(url), skip))
    recipient = None
    if "recipient" in params:
        pattern = params.pop("recipient")
        try:
            recipient = re.compile(translate(pattern, ignore_case=True)[0])
        except ValueError as exc:
            raise ValueError("%s: recipient=%s: %s" % (_mask_raw(url), pattern, exc)) from None
    failover = params.pop("failover", None)
    if failover is not None and not failover:
        raise ValueError("%s: failover needs a group name (failover=NAME)" % _mask_raw(url))
    limits: Dict[str, Any] = {}
    for name, parse in (("connections", _parse_connections), ("rate", parse_rate), ("recipients", parse_rate)):
        if name in params:
            value = params.pop(name)
            try:
                limits[name] = parse(value)
            except ValueError as exc:
                raise ValueError("%s: %s=%s: %s" % (_mask_raw(url), name, value, exc)) from None
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
        skip_verify=skip != "false",
        recipient=recipient,
        failover=failover,
        connections=limits.get("connections"),
        rate=limits.get("rate"),
        recipients=limits.get("recipients"),
    )


def _parse_connections(text: str) -> int:
    """connections=N: a whole number of at least 1 (SPEC 13)."""
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError("must be a whole number of at least 1")
    return int(text)


def _parse_params(query: str) -> dict:
    """{lower-case name: value}; a name given twice is an error (which one would win?)."""
    params = {}
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if key.lower() in params:
            raise ValueError("parameter %s is given twice" % key)
        params[key.lower()] = unquote(value)
    return params


def _mask_raw(url: str) -> str:
    """A URL that may not parse, for an error message: everything up to its
    last "@" is hidden, since a password may hold any character (SPEC 5.1)."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
