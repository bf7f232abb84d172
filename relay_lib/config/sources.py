"""Where the configuration comes from (SPEC 2.1): which file, and the `.env`
format the Go smtprelay reads from the working folder.

Owns the search order: a file named on the command line, SMTPRELAY_CONFIG,
`.env` in the working folder, `smtprelay.ini` beside the program. Must not
know the options or parse their values: config.py does that.
"""

import os
import re
import sys
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

CONFIG_VARIABLE = "SMTPRELAY_CONFIG"
DOTENV = ".env"
BESIDE_PROGRAM = "smtprelay.ini"


class Source(NamedTuple):
    path: str
    dotenv: bool  # KEY=value lines of the .env format instead of the ini format


def program_dir() -> str:
    """The folder of the frozen executable, or of relay.py."""
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.abspath(sys.executable))
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find(named: Optional[str], environ: Mapping[str, str]) -> Optional[Source]:
    """The config file to read, or None when there is none to be found."""
    if named:
        return Source(named, False)
    if environ.get(CONFIG_VARIABLE):
        return Source(environ[CONFIG_VARIABLE], False)
    dotenv = os.path.join(os.getcwd(), DOTENV)
    if os.path.isfile(dotenv):
        return Source(dotenv, True)
    ini = os.path.join(program_dir(), BESIDE_PROGRAM)
    if os.path.isfile(ini):
        return Source(ini, False)
    return None


# Go's strconv.Unquote, which the Go program applies to each .env value:
# "double quoted" with escapes, `back quoted` raw, 'x' one character.
_GO_ESCAPE = re.compile(r"\\(?:([abfnrtv\\'\"])|x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|([0-7]{3}))")
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
           "\\": "\\", "'": "'", '"': '"'}


def _go_unquote(value: str) -> str:
    """The value without its Go quotes, or unchanged when it is not a valid Go quoted string."""
    if len(value) >= 2 and value[0] == value[-1] == "`" and "`" not in value[1:-1]:
        return value[1:-1]
    if len(value) < 2 or value[0] != value[-1] or value[0] not in "\"'":
        return value
    quote, inner = value[0], value[1:-1]
    out, pos = [], 0
    for m in _GO_ESCAPE.finditer(inner):
        plain = inner[pos:m.start()]
        if "\\" in plain or quote in plain or "\n" in plain:
            return value
        out.append(plain)
        if m.group(1):
            if m.group(1) == ("'" if quote == '"' else '"'):
                return value  # \' only in '...' and \" only in "..."
            out.append(_SIMPLE[m.group(1)])
        else:
            out.append(chr(int(m.group(2) or m.group(3) or m.group(4) or "0", 16) if not m.group(5)
                           else int(m.group(5), 8)))
        pos = m.end()
    rest = inner[pos:]
    if "\\" in rest or quote in rest or "\n" in rest:
        return value
    text = "".join(out) + rest
    if quote == "'" and len(text) != 1:
        return value
    return text


def read_dotenv(path: str, prefix: str) -> Dict[str, Tuple[str, int]]:
    """The .env file as {option name: (value, line number)}.

    The Go program's rules (its `ff` library's EnvParser): one `KEY=value` a
    line; blank lines and lines starting with `#` are skipped; key and value
    are trimmed and a Go-quoted value is unquoted; KEY is an option name
    (`hostname`) or its variable (`SMTPRELAY_HOSTNAME`). No inline comments.

    Raises:
        OSError, UnicodeDecodeError: unreadable file.
        ValueError: a line without `=` or with an empty key or value, naming the line.
    """
    with open(path, encoding="utf-8-sig", newline=None) as f:
        text = f.read()
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError("line %d is not KEY=value with a value (the Go smtprelay refuses it too)" % number)
        if key.startswith(prefix) and key[len(prefix):].isupper():
            key = key[len(prefix):].lower()
        values[key] = (_go_unquote(value), number)
    return values
