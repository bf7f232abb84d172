"""The outcome policy: what each Failure means for the client, the message
and the counts (SPEC 4.1, 9, 11, 13).

Owns the only decisions made on a failure after it was seen: the reply the
client gets, whether the next failover member is tried, whether a pair is
refused for good (a bounce, with a spool) or stays pending (a retry), and
the result label the metrics count. Must not see a socket or a file:
Failures come in, replies and yes/no answers go out.
"""

from relay_lib import replies
from relay_lib.failure import COMMAND, INTERNAL, ROUTE, WAIT, WEBHOOK, Failure, Kind
from relay_lib.replies import Reply

# Stages whose Failure carries the client's reply itself (SPEC 4.2, 4.3, 13).
_OWN_REPLY = (WEBHOOK, COMMAND, ROUTE, WAIT, INTERNAL)


def step_failure(stage: str, reply: Reply, detail: str = "") -> Failure:
    """The Failure for one of our own steps (webhook, command) answered with
    `reply`: permanent for a 5xx, else temporary."""
    kind = Kind.PERMANENT if reply.code >= 500 else Kind.TEMPORARY
    return Failure(kind, stage, stage, reply, detail)


def client_reply(failure: Failure) -> Reply:
    """SPEC 4.1: a remote's 5xx passes through, prefixed by its host; a spent
    quota is 451 4.4.5 with the remote's words (SPEC 13); any other remote
    failure is 451 4.4.1; our own steps give their own reply."""
    said = failure.reply
    if failure.stage in _OWN_REPLY and said is not None:
        return said
    if said is not None and failure.kind is Kind.PERMANENT:
        enhanced = said.enhanced or "%d.0.0" % (said.code // 100)
        return replies.remote_refused(said.code, enhanced, failure.host, said.text)
    if said is not None and failure.kind is Kind.QUOTA:
        return replies.quota_spent(failure.host, said.text)
    return replies.FORWARD_TEMPFAIL


def fails_over(failure: Failure) -> bool:
    """True when the next member of a failover group gets its try (SPEC 11):
    a permanent refusal is the destination's answer."""
    return failure.kind is not Kind.PERMANENT


def refuses(failure: Failure) -> bool:
    """True when the pair is refused for good (a bounce, with a spool);
    otherwise it stays pending for a retry. A spent quota is "not today"."""
    return failure.kind is Kind.PERMANENT


def message_result(reply: Reply, queued: bool = False) -> str:
    """The `result` label of the message counter for the client's reply (SPEC 12)."""
    if queued:
        return "queued"
    return "delivered" if reply.code < 400 else "tempfailed" if reply.code < 500 else "rejected"
