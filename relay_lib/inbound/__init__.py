"""Inbound: how mail comes in (SPEC 3, 12, 14).

Owns the listeners and admission, the wire (bounded reads, STARTTLS, PROXY
headers), the SMTP state machine and its MAIL/RCPT path grammar, access
policy, users and the AUTH cache, and client limits. Hands each message to
one entry point, a handler with `deliver(envelope, body) -> Reply`.
May import: the bottom modules, config, delivery.
"""
