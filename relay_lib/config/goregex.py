"""Go (RE2) regular expressions as Python patterns with the same meaning.

Owns `translate`: RE2 text in, Python pattern text out, or ValueError(reason)
for what Python cannot express the same way. Must not compile with flags that
change meaning elsewhere: every difference is spelled out in the pattern, so
the result is used with plain `re.compile` (SPEC 2.3, "Regexes").
"""

import re
import unicodedata
from typing import Dict, List, Optional, Tuple

MAX_CHAR = 0x10FFFF
MAX_REPEAT = 1000  # RE2's limit on {n,m}

Ranges = List[Tuple[int, int]]

# Go's regexp/syntax tables: POSIX classes and Perl shorthands are ASCII only.
_POSIX: Dict[str, Ranges] = {
    "alnum": [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
    "alpha": [(0x41, 0x5A), (0x61, 0x7A)],
    "ascii": [(0x00, 0x7F)],
    "blank": [(0x09, 0x09), (0x20, 0x20)],
    "cntrl": [(0x00, 0x1F), (0x7F, 0x7F)],
    "digit": [(0x30, 0x39)],
    "graph": [(0x21, 0x7E)],
    "lower": [(0x61, 0x7A)],
    "print": [(0x20, 0x7E)],
    "punct": [(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
    "space": [(0x09, 0x0D), (0x20, 0x20)],
    "upper": [(0x41, 0x5A)],
    "word": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "xdigit": [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
}
_PERL: Dict[str, Ranges] = {
    "d": _POSIX["digit"],
    "s": [(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],  # no \v, unlike Python
    "w": _POSIX["word"],
}
# Go's "C" is Cc|Cf|Co|Cs; unassigned code points (Cn) are in no Go class.
_CATEGORY_GROUPS = {"C": ("Cc", "Cf", "Co", "Cs")}
_ESCAPES = {"a": 0x07, "f": 0x0C, "t": 0x09, "n": 0x0A, "r": 0x0D, "v": 0x0B}
_FLAGS = "imsU"
_PY_SPECIAL = set(".^$*+?{}[]\\|()")
_LEAD_FLAGS = re.compile(r"\(\?([imsU]+)\)")  # (?i) at the very start: the pattern's own base
_category_cache: Dict[str, Ranges] = {}


def translate(text: str, ignore_case: bool = False) -> Tuple[str, bool]:
    """The Python pattern that means what RE2 text `text` means, and whether
    it differs from `text`. With `ignore_case`, the whole pattern starts
    case-insensitive (as `(?i)` would make it).

    Raises:
        ValueError: what RE2 does not accept, or Python cannot match alike.
    """
    lead = _LEAD_FLAGS.match(text)
    lead_flags = lead.group(1) if lead else ""
    flags = {f: f in lead_flags for f in _FLAGS}
    flags["i"] = flags["i"] or ignore_case
    try:
        body = _Parser(text, flags, lead.end() if lead else 0).parse()
    except ValueError as exc:
        raise ValueError("regex %r: %s" % (text, exc)) from None
    own = "".join(f for f in "is" if f in lead_flags)  # m and U are spelled out per atom
    every = "".join(f for f in "is" if flags[f])
    pattern = ("(?%s)" % every if every else "") + body
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError("regex %r cannot be used: %s" % (text, exc)) from None
    return pattern, ("(?%s)" % own if own else "") + body != text


# Python's re backtracks, RE2 does not: a repeated group that itself repeats
# takes exponential time on an address that almost matches (SPEC 3.2), unless
# each round of the group ends with a character its repeats cannot take, as
# in the common ([a-z0-9-]+\.)*: then there is one way to split the text.
_NESTED = ("a repeated group that repeats inside, like (a+)+, can take Python exponential "
           "time on a hostile address; end the group with a character its repeats cannot "
           "match, like ([a-z0-9-]+\\.)*, or repeat only once")


def _delimited(last: Optional[str], repeated: List[str], ignore_case: bool) -> bool:
    """True when a group's last atom is one literal character (or its other
    case) that none of the group's repeated atoms can match."""
    if last is None or last.startswith("[") or last.startswith("(?") and "[" in last:
        return False
    flags = re.IGNORECASE if ignore_case else 0
    takes = [chr(c) for c in range(128) if re.fullmatch(last, chr(c), flags)]
    if not 1 <= len(takes) <= 2:
        return False
    return not any(re.fullmatch(atom, ch, flags) for atom in repeated for ch in takes)


def _repeats(quantifier: str) -> bool:
    """True for a quantifier that allows more than one of its atom."""
    m = re.match(r"\{(\d+)(,(\d*))?\}", quantifier)
    if m is None:
        return quantifier[0] in "*+"
    return m.group(2) is not None and (not m.group(3) or int(m.group(3)) > 1) or int(m.group(1)) > 1


def _unsupported(what: str) -> ValueError:
    return ValueError("%s is not RE2 syntax (the Go smtprelay refuses it too)" % what)


class _Parser:
    """A one-pass recursive descent over RE2 syntax that emits Python text.

    Flags are tracked per group; an atom whose flags differ from the base
    (those the pattern starts with) is wrapped as `(?i:x)`, so a flag that Go
    sets in the middle of a group (`a(?i)b|c`) keeps its reach.
    """

    def __init__(self, text: str, flags: Dict[str, bool], start: int):
        self.text = text
        self.pos = start
        self.base = dict(flags)
        self.repeats = 0  # repetitions parsed so far; a group that grew it repeats inside
        self.repeated: List[str] = []  # every repeated atom so far, in Python syntax
        self.ending: Optional[str] = None  # the last closed group's final atom, unrepeated
        self.group_repeated: List[str] = []  # the repeated atoms inside that group

    def parse(self) -> str:
        out = self._alternation(dict(self.base), top=True)
        if self.pos < len(self.text):
            raise ValueError("unmatched ')'")
        return out

    # -- structure -------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def _alternation(self, flags: Dict[str, bool], top: bool = False) -> str:
        parts: List[str] = []
        atom_ready = False  # True after an atom a quantifier may follow
        inner_repeats = False  # True when that atom holds a repetition
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == ")":
                if top:
                    raise ValueError("unmatched ')'")
                break
            if c == "|":
                self.pos += 1
                parts.append("|")
                atom_ready = False
                continue
            if c in "*+?{":
                quantifier = self._quantifier(flags)
                if quantifier is not None:
                    if not atom_ready:
                        raise ValueError("%r repeats nothing (missing argument to repetition "
                                         "operator)" % quantifier)
                    if _repeats(quantifier):
                        if inner_repeats and not _delimited(self.ending, self.group_repeated, self.base["i"]):
                            raise ValueError(_NESTED)
                        self.repeats += 1
                        self.repeated.append(parts[-1])
                    parts.append(quantifier)
                    atom_ready = False
                    continue
                self.pos += 1  # a "{" that starts no repeat is a literal in RE2
                parts.append(self._wrap(self._literal(ord("{")), flags, ("i",)))
                atom_ready, inner_repeats = True, False
                continue
            before = self.repeats
            atom = self._atom(flags)
            if atom is not None:
                parts.append(atom)
                atom_ready = True
                inner_repeats = self.repeats > before
            else:
                atom_ready = False  # a flag group like (?i) is no atom
        self.ending = parts[-1] if atom_ready and "|" not in parts else None
        return "".join(parts)

    def _quantifier(self, flags: Dict[str, bool]) -> Optional[str]:
        m = re.compile(r"[*+?]|\{(\d+)(,(\d*))?\}").match(self.text, self.pos)
        if not m:
            return None
        if m.group(1) is not None:
            low = int(m.group(1))
            high = int(m.group(3)) if m.group(3) else None
            if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                raise ValueError("repeat count above %d (RE2's limit)" % (MAX_REPEAT))
            if high is not None and high < low:
                raise ValueError("invalid repeat count %s" % (m.group(0)))
        self.pos = m.end()
        lazy = self._peek() == "?"
        if lazy:
            self.pos += 1
        if self._peek() in ("*", "+", "?") or (self._peek() == "{" and re.match(r"\{\d", self.text[self.pos:])):
            what = "possessive repetition" if self._peek() == "+" else "a repeated repetition"
            raise ValueError("%s (%s%s) is not RE2 syntax" % (what, m.group(0), self._peek()))
        if flags["U"]:
            lazy = not lazy  # (?U) swaps greedy and lazy
        return m.group(0) + ("?" if lazy else "")

    def _atom(self, flags: Dict[str, bool]) -> Optional[str]:
        c = self.text[self.pos]
        if c == "(":
            return self._group(flags)
        if c == "[":
            return self._wrap(self._class_atom(), flags, ("i",))
        if c == "\\":
            return self._escape(flags)
        self.pos += 1
        if c == ".":
            return self._wrap(".", flags, ("s",))
        if c == "^":
            return "^" if not flags["m"] else "(?m:^)"
        if c == "$":
            return "\\Z" if not flags["m"] else "(?m:$)"
        return self._wrap(self._literal(ord(c)), flags, ("i",))

    def _group(self, flags: Dict[str, bool]) -> Optional[str]:
        start = self.pos
        self.pos += 1
        inner_flags = dict(flags)
        opener = "("
        if self._peek() == "?":
            m = re.compile(r"\?P?<([A-Za-z0-9_]+)>|\?([imsU]*)(?:-([imsU]*))?([:)])").match(self.text, self.pos)
            if not m:
                raise self._bad_group(start)
            self.pos = m.end()
            if m.group(1) is None:  # flags: (?i) or (?i-s:...)
                on, off = m.group(2), m.group(3)
                if (not on and not off and m.group(4) == ")") or off == "":  # (?:x) is a plain group
                    raise ValueError("empty flag group at %d" % (start))
                for f in on:
                    inner_flags[f] = True
                for f in off or "":
                    inner_flags[f] = False
                if m.group(4) == ")":
                    flags.update(inner_flags)  # reaches to the end of the enclosing group
                    return None
                opener = "(?:"
        mark = len(self.repeated)
        body = self._alternation(inner_flags)
        self.group_repeated = self.repeated[mark:]
        if self._peek() != ")":
            raise ValueError("missing closing ) for the group at %d" % (start))
        self.pos += 1
        return opener + body + ")"

    def _bad_group(self, start: int) -> ValueError:
        rest = self.text[start:start + 4]
        names = (("(?=", "look-ahead"), ("(?!", "negative look-ahead"), ("(?<=", "look-behind"),
                 ("(?<!", "negative look-behind"), ("(?>", "an atomic group"), ("(?#", "a comment group"),
                 ("(?P=", "a back reference"), ("(?(", "a conditional group"))
        for prefix, name in names:
            if rest.startswith(prefix):
                return _unsupported("%s %s" % (name, prefix))
        return ValueError("unknown group syntax at %d (%s...)" % (start, rest))

    def _wrap(self, atom: str, flags: Dict[str, bool], relevant: Tuple[str, ...]) -> str:
        """`atom`, scoped to the flags in `relevant` that differ from the base."""
        on = "".join(f for f in relevant if flags[f] and not self.base[f])
        off = "".join(f for f in relevant if not flags[f] and self.base[f])
        if not on and not off:
            return atom
        return "(?%s%s:%s)" % (on, "-" + off if off else "", atom)

    # -- escapes ------------------------------------------------------------

    def _escape(self, flags: Dict[str, bool]) -> str:
        start = self.pos
        self.pos += 1
        if self.pos >= len(self.text):
            raise ValueError("ends with a lone backslash")
        c = self.text[self.pos]
        if c == "Q":
            end = self.text.find("\\E", self.pos + 1)
            literal = self.text[self.pos + 1:] if end < 0 else self.text[self.pos + 1:end]
            self.pos = len(self.text) if end < 0 else end + 2
            return "".join(self._wrap(self._literal(ord(ch)), flags, ("i",)) for ch in literal)
        if c in "AzbB":
            self.pos += 1
            return {"A": "\\A", "z": "\\Z", "b": "(?a:\\b)", "B": "(?a:\\B)"}[c]
        self.pos = start
        ranges, negated = self._class_escape()
        if ranges is None:
            return self._wrap(self._literal(negated), flags, ("i",))
        return self._wrap(_emit_class(ranges, negated), flags, ("i",))

    def _class_escape(self):
        """An escape that may stand inside a class: (ranges, negated) for a
        class escape like \\d or \\pL, or (None, code point) for one character."""
        self.pos += 1
        c = self.text[self.pos]
        self.pos += 1
        if c.lower() in _PERL:
            return _PERL[c.lower()], c.isupper()
        if c in "pP":
            return self._unicode_class(c == "P")
        if c in _ESCAPES:
            return None, _ESCAPES[c]
        if c == "x":
            m = re.compile(r"\{([0-9A-Fa-f]{1,6})\}|([0-9A-Fa-f]{2})").match(self.text, self.pos)
            if not m or int(m.group(1) or m.group(2), 16) > MAX_CHAR:
                raise ValueError("invalid \\x escape at %d" % (self.pos - 2))
            self.pos = m.end()
            return None, int(m.group(1) or m.group(2), 16)
        if c in "01234567":
            m = re.compile(r"[0-7]{0,2}").match(self.text, self.pos)
            if c != "0" and not m.group(0):
                raise _unsupported("a back reference \\%s" % c)
            self.pos = m.end()
            return None, int(c + m.group(0), 8)
        if c.isascii() and not c.isalnum():
            return None, ord(c)
        names = {"Z": "\\Z (write \\z for the end of the text)", "8": "a back reference \\8",
                 "9": "a back reference \\9", "k": "a named back reference \\k", "C": "\\C (any byte)"}
        raise _unsupported(names.get(c, "the escape \\" + c))

    def _unicode_class(self, negated: bool):
        if self._peek() == "{":
            end = self.text.find("}", self.pos)
            if end < 0:
                raise ValueError("missing } after \\p{")
            name = self.text[self.pos + 1:end]
            self.pos = end + 1
            if name.startswith("^"):
                name, negated = name[1:], not negated
        else:
            name = self._peek()
            self.pos += 1
        return _category(name), negated

    # -- character classes --------------------------------------------------

    def _class_atom(self) -> str:
        start = self.pos
        self.pos += 1
        negated = self._peek() == "^"
        if negated:
            self.pos += 1
        ranges: Ranges = []
        first = True
        while True:
            if self.pos >= len(self.text):
                raise ValueError("missing closing ] for the class at %d" % (start))
            c = self.text[self.pos]
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            end = self.text.find(":]", self.pos + 2) if self.text.startswith("[:", self.pos) else -1
            if end >= 0:  # as in RE2, [:...:] is always a named class
                name = self.text[self.pos + 2:end]
                if name.lstrip("^") not in _POSIX:
                    raise ValueError("unknown POSIX class [:%s:]" % name)
                part = _POSIX[name.lstrip("^")]
                ranges.extend(_complement(part) if name.startswith("^") else part)
                self.pos = end + 2
                continue
            low = self._class_char(ranges)
            if low is None:
                continue
            if self._peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self._class_char(ranges)
                if high is None or high < low:
                    raise ValueError("invalid range in the class at %d" % (start))
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        source = self.text[start:self.pos]
        if _plain_class(source):
            return source
        return _emit_class(ranges, negated)

    def _class_char(self, ranges: Ranges) -> Optional[int]:
        """One character of a class; a class escape like \\d is added to
        `ranges` and gives None."""
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return ord(c)
        if self.text.startswith("\\Q", self.pos) or self._peek(2) in ("\\b", "\\B", "\\A", "\\z"):
            raise ValueError("%s is not allowed in a class" % (self._peek(2)))
        if self.pos + 1 >= len(self.text):
            raise ValueError("ends with a lone backslash")
        found, value = self._class_escape()
        if found is None:
            return value
        ranges.extend(_complement(found) if value else found)
        return None

    # -- output ---------------------------------------------------------------

    def _literal(self, code: int) -> str:
        ch = chr(code)
        if ch in _PY_SPECIAL:
            return "\\" + ch
        if ch.isprintable() and not ch.isspace() or ch == " ":
            return ch
        return _hex(code)


def _hex(code: int) -> str:
    if code < 0x100:
        return "\\x%02x" % code
    if code < 0x10000:
        return "\\u%04x" % code
    return "\\U%08x" % code


_PLAIN_CLASS = re.compile(r"\[\^?\]?(?:[^\[\]\\&~|-]|\\[^A-Za-z0-9]|\\[tnrfv]|(?<!-)-(?!-))*\]")


def _plain_class(source: str) -> bool:
    """True when Python reads the class text exactly as RE2 does."""
    return bool(_PLAIN_CLASS.fullmatch(source))


def _normalise(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _complement(ranges: Ranges) -> Ranges:
    result, nxt = [], 0
    for low, high in _normalise(ranges):
        if low > nxt:
            result.append((nxt, low - 1))
        nxt = high + 1
    if nxt <= MAX_CHAR:
        result.append((nxt, MAX_CHAR))
    return result


def _class_char_text(code: int) -> str:
    ch = chr(code)
    if ch.isascii() and ch.isalnum():
        return ch
    if ch.isascii() and ch.isprintable() and ch != " ":
        return "\\" + ch
    if ch.isprintable() and not ch.isspace():
        return ch
    return _hex(code)


def _emit_class(ranges: Ranges, negated: bool) -> str:
    merged = _normalise(ranges)
    if not merged:  # [^\x00-\x{10FFFF}]: matches nothing
        return "[^\\x00-\\U0010ffff]" if not negated else "[\\x00-\\U0010ffff]"
    parts = []
    for low, high in merged:
        if low == high:
            parts.append(_class_char_text(low))
        elif high == low + 1:
            parts.append(_class_char_text(low) + _class_char_text(high))
        else:
            parts.append("%s-%s" % (_class_char_text(low), _class_char_text(high)))
    return "[%s%s]" % ("^" if negated else "", "".join(parts))


def _category(name: str) -> Ranges:
    """The code points of a Unicode general category (L, Lu, N, Nd, ...) or Any."""
    if name == "Any":
        return [(0, MAX_CHAR)]
    if not re.fullmatch(r"[CLMNPSZ][a-z]?", name):
        raise ValueError("\\p{%s}: only Unicode general categories (L, Lu, N, Nd, P, ...) and Any "
                         "can be matched here; Unicode scripts cannot" % name)
    if name not in _category_cache:
        wanted = _CATEGORY_GROUPS.get(name)
        ranges: Ranges = []
        for code in range(MAX_CHAR + 1):
            cat = unicodedata.category(chr(code))
            if (cat in wanted) if wanted else cat.startswith(name):
                if ranges and ranges[-1][1] == code - 1:
                    ranges[-1] = (ranges[-1][0], code)
                else:
                    ranges.append((code, code))
        if not ranges:
            raise ValueError("\\p{%s} is not a Unicode general category" % name)
        _category_cache[name] = ranges
    return _category_cache[name]
