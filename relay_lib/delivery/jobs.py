"""What a message still owes: one `Pair` per (destination, recipient) and
the steps not yet run (SPEC 9).

Owns the pair states and how pairs follow a changed configuration. Delivery
fills them in; the spool stores them and retries what is pending. Must not
send or store anything.
"""

from dataclasses import dataclass
from typing import Iterable, List

from relay_lib.envelope import Envelope

# The state of one (destination, recipient) pair (SPEC 9).
PENDING, DELIVERED, REFUSED, DISCARDED = "pending", "delivered", "refused", "discarded"


@dataclass
class Pair:
    """One recipient at one destination: its state and the last reply about it."""

    dest: str
    rcpt: str
    state: str = PENDING
    reply: str = ""
    notified: bool = False  # a bounce was made for this refusal


@dataclass
class Job:
    """A message part way through the steps: what is done and what is left.

    `scan` and `command` are the webhook and command steps still to run;
    `pairs` say what each destination still owes. A retry runs the same
    steps from the first undone one, so nothing that succeeded runs again.
    """

    env: Envelope
    message: bytes
    scan: bool
    command: bool
    pairs: List[Pair]
    error: str = ""  # why the last attempt left something pending

    def pending(self) -> List[Pair]:
        return [p for p in self.pairs if p.state == PENDING]

    def settle_pending(self, state: str, reply: str) -> None:
        for pair in self.pending():
            pair.state, pair.reply = state, reply


def follow_routes(job: Job, plan, configured) -> None:
    """A pending pair whose destination no longer takes its recipient (the
    configuration changed while it was queued: a remote's URL was fixed, a
    group renamed) goes to the recipient's current destinations that have no
    pair for it. Never while a pair that is done names a destination that is
    gone: that one may be among the current ones under a new name (SPEC 9)."""
    admitted = {(dest.name, rcpt) for dest, rcpts in plan for rcpt in rcpts}
    for pair in job.pending():
        if (pair.dest, pair.rcpt) in admitted or any(
                p.rcpt == pair.rcpt and p.state != PENDING and p.dest not in configured for p in job.pairs):
            continue
        taken = {p.dest for p in job.pairs if p.rcpt == pair.rcpt}
        names = [dest.name for dest, rcpts in plan if pair.rcpt in rcpts and dest.name not in taken]
        if names:
            pair.dest = names[0]
            job.pairs.extend(Pair(name, pair.rcpt) for name in names[1:])


def unique(addrs: Iterable[str]) -> List[str]:
    """Recipients in order without repeats (two aliases may share a target)."""
    seen, out = set(), []
    for addr in addrs:
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            out.append(addr)
    return out
