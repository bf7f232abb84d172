"""The MAIL FROM and RCPT TO path grammar [R5321 4.1.2] (SPEC 3.2): text in,
(address, parameters) or ValueError(reason) out.

Owns what a client may write between the colon and the parameters. Must not
decide policy or touch a socket: the session asks, and replies.
"""

import re
from typing import List, Tuple

# <local@domain> with no quoting, route or odd character, followed by nothing
# or by a space and parameters: what nearly every client sends.
_SIMPLE_PATH = re.compile(r'<([^\x00-\x20\x7f<>"\\@:\ufffd]+@[^\x00-\x20\x7f<>"\\@\ufffd]+)>(?= |$)')


def parse_path(text: str, null_ok: bool) -> Tuple[str, List[str]]:
    """Split `<address> params...` into the address and its parameters.

    Accepts quoted local parts (`<"a b"@x>`, kept as written), strips source
    routes (`<@a,@b:u@d>` is `u@d`) [R5321 4.1.2, C.] and allows a space
    after the colon, as many clients send one. `<>` is the null path, for
    MAIL only; RCPT takes `<postmaster>` without a domain [R5321 4.5.1], MAIL
    any bare local name. Without angle brackets (printers and old scripts
    send `MAIL FROM:a@b`), the first word is the address and the rest are
    parameters, as in Postfix; the address is then checked as if bracketed.

    Raises:
        ValueError: with the reason, when the path is malformed.
    """
    text = text.lstrip(" ")
    simple = _SIMPLE_PATH.match(text)
    if simple is not None:  # the common case, without the loop below
        return simple.group(1), text[simple.end():].split()
    if text and not text.startswith("<"):
        word, space, rest = text.partition(" ")
        if "<" in word or ">" in word:
            raise ValueError("unbalanced angle brackets")
        return _parse_path_full("<%s>%s%s" % (word, space, rest), null_ok)
    return _parse_path_full(text, null_ok)


def _parse_path_full(text: str, null_ok: bool) -> Tuple[str, List[str]]:
    """parse_path for every form: a character loop for quotes and routes."""
    if not text.startswith("<"):
        raise ValueError("missing address")
    i = 1
    if text.startswith("<@"):
        colon = text.find(":", 1)
        if colon < 0:
            raise ValueError("source route without ':'")
        i = colon + 1
    chars = []
    quoted = False
    while True:
        if i >= len(text):
            raise ValueError("missing '>'")
        c = text[i]
        if quoted:
            if c == "\\" and i + 1 < len(text):
                chars.append(c)
                i += 1
                c = text[i]
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            break
        elif c in "<\\ ":
            raise ValueError("invalid character in address")
        if c < " " or c == "\x7f" or c == "\ufffd":  # controls, or bytes that were not UTF-8
            raise ValueError("invalid character in address")
        chars.append(c)
        i += 1
    addr = "".join(chars)
    rest = text[i + 1:]
    if rest and not rest.startswith(" "):
        raise ValueError("junk after '>'")
    params = rest.split()
    if not addr:
        if not null_ok:
            raise ValueError("empty address")
        return addr, params
    local, at, domain = addr.rpartition("@")
    if not at:
        # A bare local name: devices send `MAIL FROM:<scanner>`, and the users
        # file can allow exactly that (SPEC 2.4). A recipient needs a domain,
        # except postmaster.
        if null_ok or addr.lower() == "postmaster":
            return addr, params
        raise ValueError("address needs a domain")
    if not local or not domain or '"' in domain or ("@" in local and not local.startswith('"')):
        raise ValueError("malformed address")
    return addr, params
