"""SPEC 2.3 "Regexes": Go (RE2) syntax means here what it means in Go.

The expected sets are written out from Go's regexp/syntax documentation
(POSIX classes and Perl shorthands are ASCII), not from the translator.
"""

import re
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from relay_lib.config.goregex import translate

GO_POSIX = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\x00-\x7f", "blank": "\t ",
    "cntrl": "\x00-\x1f\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@[-`{-~", "space": "\t\n\v\f\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
GO_PERL = {"d": "0-9", "s": "\t\n\f\r ", "w": "0-9A-Za-z_"}
CHARS = st.characters(max_codepoint=0x2FF) | st.sampled_from("\v\x0b\u00e6\u0660\u212a\u017f")


def members(spec):
    """The characters of a set written like a class body: 'a-z' ranges and single characters."""
    found, pos = set(), 0
    while pos < len(spec):
        if pos + 2 < len(spec) and spec[pos + 1] == "-":
            found.update(chr(c) for c in range(ord(spec[pos]), ord(spec[pos + 2]) + 1))
            pos += 3
        else:
            found.add(spec[pos])
            pos += 1
    return found


def go_match(pattern, text):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning would mean Python reads it differently
        return re.search(translate(pattern)[0], text) is not None


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(GO_POSIX)), ch=CHARS)
def test_2_3_posix_classes_are_goes_ascii_sets(name, ch):
    inside = ch in members(GO_POSIX[name])
    assert go_match("^[[:%s:]]$" % name, ch) == inside
    assert go_match("^[[:^%s:]]$" % name, ch) == (not inside)
    assert go_match("^[^[:%s:]x]$" % name, ch) == (not inside and ch != "x")


@settings(max_examples=200, deadline=None)
@given(letter=st.sampled_from("dsw"), ch=CHARS)
def test_2_3_perl_classes_are_ascii(letter, ch):
    inside = ch in members(GO_PERL[letter])
    assert go_match("^\\%s$" % letter, ch) == inside
    assert go_match("^\\%s$" % letter.upper(), ch) == (not inside)
    assert go_match("^[\\%s]$" % letter.upper(), ch) == (not inside)
    assert go_match("^[^\\%s]$" % letter, ch) == (not inside)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=20).filter(lambda t: "\\E" not in t and "\n" not in t))
def test_2_3_quoted_text_is_literal(text):
    pattern = "^\\Q%s\\E$" % text
    assert go_match(pattern, text)
    assert not go_match(pattern, text + "x")


@settings(max_examples=200, deadline=None)
@given(ch=st.characters())
def test_2_3_unicode_letter_and_number_classes(ch):
    import unicodedata

    category = unicodedata.category(ch)
    assert go_match("^\\pL$", ch) == category.startswith("L")
    assert go_match("^\\p{N}$", ch) == category.startswith("N")
    assert go_match("^\\PL$", ch) == (not category.startswith("L"))
    assert go_match("^[\\p{^N}]$", ch) == (not category.startswith("N"))


@pytest.mark.parametrize("pattern,yes,no", [
    (r"a\z", ["xa"], ["a\n"]),                     # \z: the very end
    (r"a$", ["xa"], ["a\n"]),                      # Go's $ without (?m) is \z too
    (r"(?m)^b$", ["a\nb\nc"], ["ab"]),
    (r"a.b", ["axb"], ["a\nb"]),
    (r"(?s)a.b", ["a\nb"], []),
    (r"a(?i)b|c", ["aB", "C"], ["AB"]),            # a flag reaches the group's end, across |
    (r"(?i:X)y", ["xy"], ["xY"]),
    (r"\bfoo\b", ["a foo", "\u00e6foo"], ["_foo"]),  # \b is an ASCII word boundary
    (r"\x{41}\101\12", ["AA\n"], []),               # hex in braces, octal escapes
    (r"a{,2}", ["a{,2}"], ["aa"]),                 # not a repeat in RE2: literal text
    (r"^(?U)a+", ["a"], []),
    (r"^(?P<user>[a-z]+)@(?<dom>x)$", ["ab@x"], ["1@x"]),
    (r"[[:alpha:]-]+", ["-"], ["1"]),
    (r"[a[b&&c]", ["[", "&"], ["d"]),               # Python would warn on [[ and &&
])
def test_2_3_regexes_mean_what_they_mean_in_go(pattern, yes, no):
    for text in yes:
        assert go_match(pattern, text), (pattern, text)
    for text in no:
        assert not go_match(pattern, text), (pattern, text)


def test_2_3_ungreedy_flag_swaps_repeats():
    assert re.match(translate("(?U)a+")[0], "aaa").group(0) == "a"
    assert re.match(translate("(?U)a+?")[0], "aaa").group(0) == "aaa"


def test_2_3_plain_regex_is_kept_as_written():
    assert translate(r"^[a-z0-9._%+-]+@example\.com") == (r"^[a-z0-9._%+-]+@example\.com", False)
    assert translate(r"(?i)@(foo|bar)\.com") == (r"(?i)@(foo|bar)\.com", False)
    assert translate(r"@x\.com$")[1] is True


def test_2_3_recipient_regex_is_case_insensitive():
    pattern, _ = translate(r"[[:lower:]]+@x(?-i:Y)", ignore_case=True)
    assert re.fullmatch(pattern, "ABC@XY") and not re.fullmatch(pattern, "abc@xy")


@pytest.mark.parametrize("pattern,why", [
    (r"(?=a)", "look-ahead"), (r"(?!a)", "look-ahead"), (r"(?<=a)b", "look-behind"),
    (r"(?<!a)b", "look-behind"), (r"(a)\1", "back reference"), (r"(?P<n>a)(?P=n)", "back reference"),
    (r"a*+", "possessive"), (r"a++", "possessive"), (r"a**", "repeated repetition"),
    (r"a\Z", "\\z"), (r"(?>a)", "atomic"), (r"\p{Greek}", "scripts"), (r"a{1001}", "1000"),
    (r"*a", "repeats nothing"), (r"(a", "missing closing )"), (r"[a", "missing closing ]"),
    (r"a)", "unmatched"), (r"[[:word2:]]", "POSIX"), (r"\C", "\\C"), (r"[z-a]", "range"),
    (r"(?#c)", "comment"), ("a\\", "backslash"), (r"\e", "\\e"),
])
def test_2_3_regexes_without_go_meaning_are_refused(pattern, why):
    with pytest.raises(ValueError) as info:
        translate(pattern)
    assert why in str(info.value) and str(info.value).startswith("regex %r" % pattern)
