"""Outbound: talking to the places mail goes (SPEC 5.3, 10, 13).

Owns the SMTP client connection, the per-remote pool with AUTH and the
transaction, remote limits and throttle feedback, OAuth tokens and the
`file:` outbox. Reports every failure as a `Failure` value, never raises one
across its boundary, and never chooses a remote or a client reply.
May import: the bottom modules, config.
"""
