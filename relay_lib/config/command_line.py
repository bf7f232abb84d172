"""The `command` option as a program and its arguments (SPEC 4.3): split
without a shell, by Windows rules on Windows and POSIX shell rules elsewhere.

Owns how a command line becomes words. Must not run anything: delivery does.
"""

import os
import shlex
from typing import List, Tuple


def split_windows(text: str) -> List[str]:
    """Split a command line by the Windows rules (CommandLineToArgvW, the
    inverse of subprocess.list2cmdline): whitespace separates words outside
    double quotes; backslashes are literal except before a quote, where 2n
    of them give n and a quote that toggles quoting, and 2n+1 give n and a
    literal quote."""
    words: List[str] = []
    word: List[str] = []
    in_word = quoted = False
    pos = 0
    while pos < len(text):
        c = text[pos]
        if c == "\\":
            run = len(text[pos:]) - len(text[pos:].lstrip("\\"))
            pos += run
            if pos < len(text) and text[pos] == '"':
                word.append("\\" * (run // 2))
                if run % 2:
                    word.append('"')
                    pos += 1
            else:
                word.append("\\" * run)
            in_word = True
            continue
        if c == '"':
            quoted = not quoted
            in_word = True
        elif c in " \t" and not quoted:
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(c)
            in_word = True
        pos += 1
    if in_word:
        words.append("".join(word))
    return words


def split_command(text: str, windows: bool) -> List[str]:
    """The words of `command`: Windows rules on Windows, POSIX shell quoting elsewhere."""
    if windows:
        return split_windows(text)
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError("%r: %s" % (text, exc)) from None


def parse_command(text: str) -> Tuple[str, ...]:
    """The program and its arguments, without a shell.

    An unquoted program path with spaces (`C:\\Program Files\\Scan\\scan.exe
    --x`, or the Go program's `command`, which is one path and no arguments)
    runs when some leading words together name an existing file; the longest
    such prefix is the program.
    """
    words = split_command(text, os.name == "nt")
    if words and '"' not in text and "'" not in text and not os.path.isfile(words[0]):
        for n in range(len(words), 1, -1):
            program = " ".join(words[:n])
            if os.path.isfile(program):
                return (program,) + tuple(words[n:])
    return tuple(words)
