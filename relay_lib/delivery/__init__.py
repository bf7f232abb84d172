"""Delivery: what happens after the final dot (SPEC 4, 5.2, 11).

Owns the Received header, aliases, the webhook and command steps, routing
recipients to destinations and failover groups, and the one outcome policy
that turns each Failure into the client's reply and a decision (fail over,
retry, refuse). Knows nothing of a queue: it reports what each
(destination, recipient) pair did, and the spool decides what to keep.
May import: the bottom modules, config, outbound.
"""
