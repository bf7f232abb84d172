"""Policy: small pure decisions that return a Reply to refuse, or None.

Owns who may connect, send, receive and authenticate, and the users table
that is re-read when its file changes. Must not touch sockets; the
decisions do not log either: callers log one warning with the reason (only
the table logs, a reload or a skipped line).
"""

import ipaddress
from typing import Dict, List, Optional, Tuple, Union

import bcrypt

from relay_lib import replies
from relay_lib.config.settings import Settings
from relay_lib.delivery.aliases import Aliases
from relay_lib.delivery.routing import route
from relay_lib.inbound.authcache import AuthGuard
from relay_lib.replies import Reply
from relay_lib.watched import WatchedFile

# A real hash of a random password: checked against when the user is unknown,
# so a wrong user name costs the same time as a wrong password.
_DUMMY_HASH = b"$2b$10$0cuKQ60zkIBqBp5sFB.AS.faJA9ZujW39yOaz6uN8QZmVqQn/Aczm"


def peer_address(ip: str):
    """The client address, with IPv4-mapped IPv6 (::ffff:a.b.c.d) as IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_nets(ip: str, nets: tuple) -> bool:
    """True when the address is in one of the networks."""
    addr = peer_address(ip)
    return any(addr.version == net.version and addr in net for net in nets)


def check_peer(settings: Settings, ip: str) -> Optional[Reply]:
    """allowed_nets at connect (SPEC 3.1)."""
    if not settings.allowed_nets or in_nets(ip, settings.allowed_nets):
        return None
    return replies.ACCESS_DENIED


def addr_allowed(addr: str, allowed: List[str]) -> bool:
    """Per-user allowed senders (SPEC 2.4): exact, @domain, or bare local name."""
    addr = addr.lower()
    domain = addr.rpartition("@")[2] if "@" in addr else ""
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("@"):
            if entry[1:] == domain:
                return True
        elif entry == addr:
            return True
    return False


def check_sender(settings: Settings, users: Optional["Users"], user: Optional[str], addr: str) -> Optional[Reply]:
    """allowed_sender and the user's own allowed-from list."""
    if settings.allowed_sender is not None and not settings.allowed_sender.search(addr):
        return replies.SENDER_NOT_ALLOWED
    if user is not None and users is not None:
        allowed = users.allowed_from(user)
        if allowed is not None and not addr_allowed(addr, allowed):
            return replies.SENDER_NOT_ALLOWED
    return None


def check_recipient(settings: Settings, addr: str) -> Optional[Reply]:
    """allowed_recipients."""
    if settings.allowed_recipients is not None and not settings.allowed_recipients.search(addr):
        return replies.RECIPIENT_NOT_ALLOWED
    return None


def check_route(settings: Settings, aliases: Aliases, sender: str, rcpt: str) -> Optional[Reply]:
    """Refuse at RCPT a recipient that no remote would receive (SPEC 5.2).

    With remotes configured this holds even when a command also runs: the
    command is an extra step, not a route. With a command alone, it takes all.
    """
    if not settings.remotes:
        return None
    target = aliases.resolve(rcpt)
    if route(settings.remotes, sender, [target], settings.strict_sender):
        return None
    return replies.NO_ROUTE


class Users(WatchedFile):
    """The allowed_users file (SPEC 2.4): `user bcrypt-hash [from,...]`, and
    the AuthGuard that keeps checking it cheap for clients and dear for guessers."""

    def __init__(self, path: Optional[str], cache_ttl: float, wait: float):
        self.guard = AuthGuard(cache_ttl, wait)
        super().__init__(path)

    def _swapped(self) -> None:
        self.guard.forget()

    def _parse(self, lines: List[str]) -> Dict[str, Tuple[str, bytes, Optional[List[str]]]]:
        table = {}
        for number, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) not in (2, 3):
                self._skip(number, "expected: user bcrypt-hash [allowed-from,...]")
                continue
            name, hashed = parts[0], parts[1]
            if not hashed.startswith("$"):
                self._skip(number, "the second field looks like a plain-text password, not a bcrypt "
                                   "hash; replace it with the output of smtprelay -hash-password")
                continue
            if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                self._skip(number, "not a bcrypt hash ($2a$, $2b$ or $2y$)")
                continue
            allowed = [a for a in parts[2].split(",") if a] if len(parts) == 3 else None
            # bcrypt's $2y$ (htpasswd -B) is the same algorithm as $2b$.
            table[name.lower()] = (name, ("$2b$" + hashed[4:]).encode("ascii", "replace"), allowed)
        return table

    def authenticate(self, username: str, password: str, client: str) -> Union[str, Reply]:
        """The user's name when the password matches, else the Reply to refuse
        with (535, or 454 for a guessing `client` address or a bcrypt queue
        that did not move within read_timeout). Slow on purpose, unless remembered."""
        entry = self._refresh().get(username.lower())
        hashed = entry[1] if entry else _DUMMY_HASH
        secret = password.encode("utf-8", "surrogateescape")

        def verify() -> bool:
            try:
                return bcrypt.checkpw(secret, hashed) and entry is not None
            except ValueError:
                return False

        refusal = self.guard.check(str(peer_address(client)), username, secret, hashed, verify)
        return refusal if refusal is not None else entry[0]

    def allowed_from(self, username: str) -> Optional[List[str]]:
        entry = self._refresh().get(username.lower())
        return entry[2] if entry else []
