"""Errors in one place: the core's error classes are defined in lorakit/errors.py, the
adapter files' in lorakit/io_errors.py (each carries the file's ``path``).

The integrations (lorakit/hf, lorakit/yolo) may define errors of their own beside the
code that raises them; the rest of the package may not. Old import paths keep working.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit
from lorakit import errors

PACKAGE = Path(lorakit.__file__).resolve().parent
HOMES = {"errors.py", "io_errors.py"}
INTEGRATIONS = ("hf", "yolo")


def _error_classes(path: Path) -> list[str]:
    """Public classes in ``path`` that derive (by name) from an exception class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            bases = [
                b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases
            ]
            if any(b.endswith(("Error", "Exception")) for b in bases):
                found.append(node.name)
    return found


def test_the_cores_errors_are_defined_only_in_their_homes() -> None:
    stray = [
        f"{p.relative_to(PACKAGE)}: {name}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] not in INTEGRATIONS and p.name not in HOMES
        for name in _error_classes(p)
    ]
    assert not stray, "error classes outside lorakit/errors.py and lorakit/io_errors.py: " + ", ".join(stray)


def test_the_scan_sees_the_homes() -> None:
    assert "ArgError" in _error_classes(PACKAGE / "errors.py")
    assert "AdapterFileError" in _error_classes(PACKAGE / "io_errors.py")


def test_moved_errors_keep_their_old_import_path() -> None:
    from lorakit.cli.args import ArgError

    assert ArgError is errors.ArgError
