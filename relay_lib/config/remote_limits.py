"""Remote limits in effect (SPEC 13): for each account, how many connections,
messages and recipients its remotes may have, and where each value came from.

Owns the precedence (URL parameter, then the ini option, then the known
provider rule, then the built-in default), the account key and the rule that
remotes of one account share the lowest of each limit. Must not count, wait
or talk to a remote: the outbound side does that with these values.
"""

from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from relay_lib.config.remotes import LIMIT_FIELDS, Remote
from relay_lib.limits import Rate, parse_rate

DEFAULT_CONNECTIONS = 20

# Where a limit came from, as RemoteLimits.sources and -check say it.
URL, INI, PROVIDER, DEFAULT = "url", "ini", "known provider", "default"

# Microsoft 365 SMTP AUTH submission: 3 connections per mailbox (a fourth gets
# 432 4.3.2), 30 messages a minute, 10,000 recipients a day (SPEC 13).
_MICROSOFT_365 = {"connections": 3, "rate": parse_rate("30/m"), "recipients": parse_rate("10000/d")}
KNOWN_PROVIDERS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "smtp.office365.com": _MICROSOFT_365,
    "smtp-mail.outlook.com": _MICROSOFT_365,
})
_DEFAULTS = {"connections": DEFAULT_CONNECTIONS, "rate": None, "recipients": None}

Account = Tuple[str, str, int, str]


@dataclass(frozen=True)
class RemoteLimits:
    """The limits of one account, shared by every remote of that account.

    `rate` and `recipients` are None for no limit. `sources` says, for each
    of "connections", "rate" and "recipients", where the value came from:
    "url", "ini", "known provider" or "default" (with remotes sharing an
    account, "url" may be another remote's URL).
    """

    connections: int
    rate: Optional[Rate]
    recipients: Optional[Rate]
    account: Account
    sources: Mapping[str, str] = field(hash=False)

    def describe(self) -> str:
        """`connections=3 (known provider) rate=30/m (url) recipients=none (default)`, for -check."""
        return " ".join("%s=%s (%s)" % (name, "none" if getattr(self, name) is None else getattr(self, name),
                                        self.sources[name]) for name in LIMIT_FIELDS)


def account_key(remote: Remote) -> Account:
    """(scheme, host, port, user): remotes with the same key are one account
    upstream, so they share one set of limits (SPEC 13). The host compares
    without case or a final dot; a remote without a user has user ""."""
    return (remote.scheme, _host(remote), remote.port, remote.username or "")


def _host(remote: Remote) -> str:
    return remote.host.lower().rstrip(".")


def effective_limits(remotes: Tuple[Remote, ...], ini: Mapping[str, object]) -> Dict[Account, RemoteLimits]:
    """{account: its limits} for every remote but file: ones.

    `ini` holds the values of remote_connections, remote_rate and
    remote_recipients under "connections", "rate" and "recipients", for
    those the configuration set; an option left at its default is absent,
    so the known provider rule still applies.
    """
    wanted: Dict[Account, List[Dict[str, Tuple[Any, str]]]] = {}
    for remote in remotes:
        if remote.scheme != "file":
            wanted.setdefault(account_key(remote), []).append(_own_limits(remote, ini))
    found = {}
    for account, each in wanted.items():
        chosen = {name: _strictest(name, [own[name] for own in each]) for name in LIMIT_FIELDS}
        found[account] = RemoteLimits(
            connections=chosen["connections"][0], rate=chosen["rate"][0], recipients=chosen["recipients"][0],
            account=account, sources=MappingProxyType({name: chosen[name][1] for name in LIMIT_FIELDS}))
    return found


def _own_limits(remote: Remote, ini: Mapping[str, object]) -> Dict[str, Tuple[Any, str]]:
    """{limit: (value, source)} for one remote on its own, before its account is considered."""
    provider = KNOWN_PROVIDERS.get(_host(remote), {})
    own = {}
    for name in LIMIT_FIELDS:
        if getattr(remote, name) is not None:
            own[name] = (getattr(remote, name), URL)
        elif ini.get(name) is not None:
            own[name] = (ini[name], INI)
        elif name in provider:
            own[name] = (provider[name], PROVIDER)
        else:
            own[name] = (_DEFAULTS[name], DEFAULT)
    return own


def _strictest(name: str, candidates: List[Tuple[Any, str]]) -> Tuple[Any, str]:
    """The strictest (value, source); min() keeps the first listed of equal values."""
    return min(candidates, key=lambda pair: _strictness(name, pair[0]))


def _strictness(name: str, value: Any) -> tuple:
    """Sort key: the stricter limit first. A rate is stricter when its average
    (count per second, compared exactly) is lower, then when its burst is
    smaller; no rate at all is the least strict."""
    if name == "connections":
        return (value,)
    if value is None:
        return (1, 0, 0)
    return (0, Fraction(value.count) / Fraction(value.per), value.count)
