"""The behaviour reference in docs/ is what section numbers in the code point at.

A comment citing a section ("SPEC" and a number) and a test named
test_<n>_<m>_... both refer to a numbered heading in docs/; these tests fail
when a citation has no heading to land on, or when the index misses a file.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".ini", ".txt", ".cfg", ".toml"}
SKIP_DIRS = {"build", "dist", "outbox", "__pycache__", "node_modules"}

SPEC_CITATION = re.compile(r"\bSPEC (\d+(?:\.\d+)*)")
TEST_NAME = re.compile(r"\btest_(\d+)(?:_(\d+))?_[a-z]")
HEADING = re.compile(r"^#{1,6} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
ANY_HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
LOCAL_LINK = re.compile(r"\]\(([0-9A-Za-z._-]+\.md)?(?:#([^)]*))?\)")


def _repository_texts():
    """(relative path, text) of every source and documentation file of the repository."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            path = Path(folder, name)
            if not name.startswith(".") and (path.suffix in TEXT_SUFFIXES or name == "Makefile"):
                yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _citations():
    """{section number: [where it is cited, ...]} over the whole repository."""
    found = {}
    for name, text in _repository_texts():
        for lineno, line in enumerate(text.splitlines(), 1):
            numbers = [m.group(1) for m in SPEC_CITATION.finditer(line)]
            numbers += [".".join(g for g in m.groups() if g) for m in TEST_NAME.finditer(line)]
            for number in numbers:
                found.setdefault(number, []).append("%s:%d" % (name, lineno))
    return found


def _headings():
    """{section number: docs file name} for every numbered heading in docs/."""
    return {m.group(1): path.name
            for path in sorted(DOCS.glob("*.md"))
            for m in HEADING.finditer(path.read_text(encoding="utf-8"))}


def test_docs_every_spec_citation_resolves():
    citations = _citations()
    assert "3.2" in citations and "4.2" in citations  # the scan sees the code and the tests
    headings = _headings()
    missing = {n: where[:3] for n, where in citations.items() if n not in headings}
    assert not missing, "sections cited but without a heading in docs/: %s" % missing


def test_docs_sections_live_in_their_numbered_file():
    misplaced = {n: name for n, name in _headings().items()
                 if int(name.split("-", 1)[0]) != int(n.split(".", 1)[0])}
    assert not misplaced, misplaced


def test_docs_index_links_every_file_and_readme_links_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    sections = sorted(p.name for p in DOCS.glob("[0-9][0-9]-*.md"))
    assert len(sections) >= 12
    assert [n for n in sections if "(%s)" % n not in index] == []
    assert "(docs/README.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def _anchor(heading: str) -> str:
    """The fragment a Markdown renderer (GitHub's rule) gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_between_files_resolve():
    anchors = {p.name: {_anchor(h) for h in ANY_HEADING.findall(p.read_text(encoding="utf-8"))}
               for p in DOCS.glob("*.md")}
    broken = []
    for name in sorted(anchors):
        for target, fragment in LOCAL_LINK.findall((DOCS / name).read_text(encoding="utf-8")):
            target = target or name
            if target not in anchors or (fragment and fragment not in anchors[target]):
                broken.append("%s -> %s#%s" % (name, target, fragment))
    assert broken == []
