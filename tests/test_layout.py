"""SPEC 7 (layout): imports follow the message's way. Each package may import
only what its `__init__` docstring's "May import:" line names, and that line
matches the table in README.md's architecture section and CONTRIBUTING.md."""

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "relay_lib")
WIRING = ("cli", "service")  # may import anything: they build and connect everything
ALLOWED = {
    "config": {"bottom", "config"},
    "inbound": {"bottom", "config", "inbound", "delivery"},
    "delivery": {"bottom", "config", "delivery", "outbound"},
    "outbound": {"bottom", "config", "outbound"},
    "spool": {"bottom", "config", "spool", "delivery"},
    "ops": {"bottom", "config", "ops"},
    "bottom": {"bottom"},
}


def _modules():
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, PACKAGE).split(os.sep)
                yield path, parts


def _layer(parts):
    """The layer of a module, from its path inside relay_lib (None for the wiring)."""
    if len(parts) == 1:
        stem = parts[0][:-3]
        return None if stem in WIRING else "bottom"
    return parts[0]


def _target(dotted):
    """The layer an imported relay_lib module belongs to."""
    pieces = dotted.split(".")
    if len(pieces) == 1:
        return "bottom"  # `from relay_lib import __version__`
    if pieces[1] in ALLOWED:
        return pieces[1]
    return "wiring" if pieces[1] in WIRING else "bottom"


def _imports(path, parts):
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = ["relay_lib"] + parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "relay_lib":
                for alias in node.names:
                    yield node.lineno, "relay_lib." + alias.name if alias.name in ALLOWED or \
                        alias.name in WIRING else "relay_lib"
            elif module.startswith("relay_lib."):
                yield node.lineno, module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("relay_lib"):
                    yield node.lineno, alias.name


def test_7_layout_imports_follow_the_message():
    wrong = []
    for path, parts in _modules():
        layer = _layer(parts)
        if layer is None:
            continue
        for line, module in _imports(path, parts):
            target = _target(module)
            if target not in ALLOWED[layer]:
                wrong.append("%s:%d imports %s (%s may import %s)" % (
                    os.path.relpath(path, ROOT), line, module, layer, ", ".join(sorted(ALLOWED[layer]))))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(set(ALLOWED) - {"bottom"}))
def test_7_layout_each_package_says_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, package, "__init__.py")).read())) or ""
    lines = [ln for ln in doc.replace("\n", " ").split(". ") if "May import:" in ln]
    assert lines, "relay_lib/%s/__init__.py has no 'May import:' line" % package
    named = lines[0].split("May import:", 1)[1].replace("the bottom modules", "bottom").strip(" .")
    assert {word.strip() for word in named.split(",")} == ALLOWED[package] - {package}


def test_7_layout_the_test_sees_a_wrong_import(tmp_path):
    """The check itself: an outbound module importing delivery is caught."""
    source = tmp_path / "bad.py"
    source.write_text("from relay_lib.delivery import outcome\nfrom relay_lib import failure\n")
    found = list(_imports(str(source), ["outbound", "bad.py"]))
    assert [_target(m) for _, m in found] == ["delivery", "bottom"]
    assert "delivery" not in ALLOWED["outbound"]
