"""Addresses: small questions about hosts that several layers ask.

Owns `is_loopback` (asked before AUTH in the clear, plain-http webhooks and
token endpoints). Must not look names up.
"""

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (no name lookup)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
