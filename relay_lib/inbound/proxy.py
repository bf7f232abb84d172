"""The PROXY protocol header, versions 1 and 2, that a load balancer sends
before the client's first byte (SPEC 12; haproxy.org proxy-protocol.txt).

Owns the parsing: bytes in, the client's (address, port) or LOCAL out, or
ValueError. Must not touch a socket: the caller reads the bytes, asking
`header_length` how many belong to the header so it never reads past it.
"""

import ipaddress
import struct
from typing import Optional, Tuple, Union

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length
# Addresses take at most 216 octets (AF_UNIX); TLVs may follow. The limit
# bounds what a header can cost; real ones (HAProxy, AWS NLB) are far below.
V2_MAX_PAYLOAD = 2048
MAX_HEADER = V2_FIXED + V2_MAX_PAYLOAD

_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_UNSPEC = 0x00
_V2_FAMILIES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP over IPv4 and IPv6: address octets, payload


class _Local:
    """The header carries no client address (v2 LOCAL, v1 UNKNOWN): keep the proxy's."""

    def __repr__(self) -> str:
        return "LOCAL"


LOCAL = _Local()
Result = Union[Tuple[str, int], _Local]


def header_length(data: bytes) -> Optional[int]:
    """The length of the header that `data` begins with, or None while the
    bytes so far do not tell it yet.

    Raises:
        ValueError: `data` cannot be the start of a PROXY header, or the
            header would be longer than allowed.
    """
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        end = data.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX:
            raise ValueError("v1 line without CRLF in %d octets" % V1_MAX)
        return None
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        if len(data) < V2_FIXED:
            return None
        length = struct.unpack_from("!H", data, 14)[0]
        if length > V2_MAX_PAYLOAD:
            raise ValueError("v2 header of %d octets (at most %d)" % (length, V2_MAX_PAYLOAD))
        return V2_FIXED + length
    raise ValueError("no PROXY header")


def parse(header: bytes) -> Result:
    """The client's (address, port), or LOCAL, from one whole header.

    Raises:
        ValueError: not exactly one well-formed v1 or v2 header.
    """
    if header_length(header) != len(header):
        raise ValueError("truncated or trailing octets")
    if header.startswith(V1_PREFIX):
        return _parse_v1(header[:-2])
    return _parse_v2(header)


def _parse_v1(line: bytes) -> Result:
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return LOCAL  # the proxy cannot tell: use the connection's own address
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ValueError("v1 line is not PROXY TCP4|TCP6 src dst sport dport")
    try:
        if b"%" in parts[2]:
            raise ValueError("scoped address")
        text = parts[2].decode("ascii")
        source = ipaddress.IPv4Address(text) if parts[1] == b"TCP4" else ipaddress.IPv6Address(text)
        ipaddress.ip_address(parts[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("v1 address is not a %s address" % parts[1].decode()) from None
    _port(parts[5])
    return str(source), _port(parts[4])


def _port(word: bytes) -> int:
    if not (word.isdigit() and len(word) <= 5 and int(word) <= 65535):
        raise ValueError("v1 port is not a number from 0 to 65535")
    return int(word)


def _parse_v2(header: bytes) -> Result:
    command, family = header[12], header[13]
    if command == _V2_LOCAL:
        return LOCAL  # the proxy's own connection, such as a health check
    if command != _V2_PROXY:
        raise ValueError("v2 version/command 0x%02x (want 0x20 LOCAL or 0x21 PROXY)" % command)
    if family == _V2_UNSPEC:
        return LOCAL
    if family not in _V2_FAMILIES:
        raise ValueError("v2 family 0x%02x is not TCP over IPv4 or IPv6" % family)
    size, needed = _V2_FAMILIES[family]
    payload = header[V2_FIXED:]
    if len(payload) < needed:
        raise ValueError("v2 addresses take %d octets, header has %d" % (needed, len(payload)))
    source = ipaddress.ip_address(payload[:size])
    port = struct.unpack_from("!H", payload, 2 * size)[0]
    return str(source), port  # TLVs after the addresses are not needed
