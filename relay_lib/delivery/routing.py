"""Routing: which destinations get which recipients (SPEC 5.2, 11).

Owns `Destination` (one remote, or a failover group tried member after
member), routing by recipient and the failover loop. Must not talk to a
remote or write a file: sending is a callable it is given.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

from relay_lib.config.remotes import Remote
from relay_lib.delivery import outcome
from relay_lib.failure import Failure


@dataclass(frozen=True)
class Destination:
    """Where one copy of a message goes (SPEC 11): a single remote, or the
    members of a failover group in the order listed.

    `name` is unique among the destinations and stable across restarts of
    the same configuration: the group's `failover=NAME`, or the single
    remote's masked URL, with `#2`, `#3`... when that is already taken.
    """

    name: str
    members: Tuple[Remote, ...]

    def admits(self, rcpt: str) -> bool:
        """A group admits a recipient when any member does."""
        for member in self.members:
            if member.admits(rcpt):
                return True
        return False


_last_destinations: Tuple[object, Tuple[Destination, ...]] = (None, ())


def destinations(remotes: Tuple[Remote, ...]) -> Tuple[Destination, ...]:
    """The remotes as destinations, each group where its first member is listed.

    Built once per remotes tuple (route() runs at every RCPT and message).
    """
    global _last_destinations
    cached = _last_destinations
    if cached[0] is remotes:
        return cached[1]
    groups: Dict[str, List[Remote]] = {}
    order: List[Union[Remote, str]] = []
    for remote in remotes:
        if remote.failover is None:
            order.append(remote)
        elif remote.failover in groups:
            groups[remote.failover].append(remote)
        else:
            groups[remote.failover] = [remote]
            order.append(remote.failover)
    built, taken = [], set()
    for item in order:
        name = item if isinstance(item, str) else item.masked()
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = "%s#%d" % (name, count)
        taken.add(unique)
        built.append(Destination(unique, tuple(groups[item]) if isinstance(item, str) else (item,)))
    result = tuple(built)
    _last_destinations = (remotes, result)  # one tuple assignment: safe to race between threads
    return result


def route(remotes: Tuple[Remote, ...], sender: str, rcpts, strict_sender: bool):
    """Pair each taking-part destination with the recipients it admits
    (SPEC 5.2); in a group, routing applies to each member (SPEC 11)."""
    plan = []
    for dest in destinations(remotes):
        if strict_sender:
            members = tuple(m for m in dest.members if (m.sender or "").lower() == sender.lower())
            if len(members) != len(dest.members):
                dest = Destination(dest.name, members)
        mine = [r for r in rcpts if dest.admits(r)]
        if mine:
            plan.append((dest, mine))
    return plan


# What sending to one member gave: its final reply and the recipients it
# refused for now while taking the others, or the Failure of the whole. The
# third argument is room already reserved for it (see `deliver`), or None;
# the fourth is True for the last member tried, which may wait out a
# throttle reply where the others pass it on to the next member (SPEC 13).
Sending = Callable[[Remote, List[str], Optional[object], bool], Union[Tuple[str, List[str]], Failure]]
# Room at the first member that has it, else at whichever gets it first:
# (its index, the reservation), or the Failure of a wait that ran out.
Reserving = Callable[[List[Remote], List[int]], Union[Tuple[int, object], Failure]]


def deliver(dest: Destination, rcpts: List[str], send: Sending,
            attempted: Callable[[Remote, Union[Tuple[str, List[str]], Failure]], None],
            is_down: Callable[[Remote], bool],
            reserve: Optional[Reserving] = None) -> Optional[Tuple[Remote, Failure]]:
    """Hand `rcpts` to a destination; None when no member failed as a whole,
    else the member and the Failure that decide the reply (SPEC 11).

    Members are tried in order, each with the pending recipients it admits,
    the next one only when the outcome policy says the failure fails over.
    Recipients a member refused for now, one by one, stay pending for the
    next member. Members that `is_down` are left out, unless a recipient is
    admitted by no other member: then all are tried, in order. With
    `reserve`, a member without room is passed over for the first one that
    has room, or gets it first (SPEC 13). `attempted` hears each member's
    outcome, for the log.
    """
    members = live = dest.members
    if len(members) > 1:
        live = tuple(m for m in members if not is_down(m))
        if len(live) != len(members) and not all(any(m.admits(r) for m in live) for r in rcpts):
            live = members
    pending = list(rcpts)
    held = None
    if reserve is not None and len(live) > 1:
        takers = [m for m in live if any(m.admits(r) for r in pending)]
        picked = reserve(takers, [sum(1 for r in pending if m.admits(r)) for m in takers])
        if isinstance(picked, Failure):
            attempted(takers[0], picked)
            return takers[0], picked
        first = takers[picked[0]]
        live, held = (first,) + tuple(m for m in live if m is not first), picked[1]
    found: Optional[Tuple[Remote, Failure]] = None
    for index, remote in enumerate(live):
        mine = [r for r in pending if remote.admits(r)]
        if not mine:
            continue
        last = not any(m.admits(r) for m in live[index + 1:] for r in mine)
        result = send(remote, mine, held, last)
        held = None
        attempted(remote, result)
        if isinstance(result, Failure):
            found = (remote, result)
            if not outcome.fails_over(result):
                return found
            continue
        owed = result[1]
        pending = [r for r in pending if r not in mine or r in owed]
        if not pending:
            return None
    return found
