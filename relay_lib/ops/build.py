"""What `-version` prints: the release and the commit it was built from.

Owns finding the commit: the COMMIT file that `make exe` bundles in the
relay_lib folder, else the git checkout the code runs from, read from its files. Must
not run git (a server may have none) and never fails: "unknown" instead.
"""

import os
import re
from typing import Optional

from relay_lib import __version__

COMMIT_FILE = "COMMIT"
_HEX = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _git_dir(folder: str) -> Optional[str]:
    """The .git folder of a checkout (a worktree's .git is a file naming it)."""
    dot_git = os.path.join(folder, ".git")
    if os.path.isdir(dot_git):
        return dot_git
    text = _read(dot_git)
    if text and text.startswith("gitdir:"):
        return os.path.normpath(os.path.join(folder, text[len("gitdir:"):].strip()))
    return None


def _resolve(git_dir: str) -> Optional[str]:
    head = _read(os.path.join(git_dir, "HEAD")) or ""
    if _HEX.fullmatch(head):
        return head
    if not head.startswith("ref:"):
        return None
    ref = head[len("ref:"):].strip()
    common = _read(os.path.join(git_dir, "commondir"))
    common_dir = os.path.normpath(os.path.join(git_dir, common)) if common else git_dir
    for folder in (git_dir, common_dir):
        value = _read(os.path.join(folder, *ref.split("/")))
        if value and _HEX.fullmatch(value):
            return value
    for line in (_read(os.path.join(common_dir, "packed-refs")) or "").splitlines():
        value, _, name = line.partition(" ")
        if name == ref and _HEX.fullmatch(value):
            return value
    return None


def commit() -> str:
    """The commit this program was built from, or "unknown"."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # relay_lib/
    bundled = _read(os.path.join(package, COMMIT_FILE))
    if bundled:
        return bundled
    git_dir = _git_dir(os.path.dirname(package))
    found = _resolve(git_dir) if git_dir else None
    return found or "unknown"


def version_line() -> str:
    """`smtprelay/<version> (<commit>)`, the shape of the Go program's -version."""
    return "smtprelay/%s (commit %s)" % (__version__, commit()[:12])
