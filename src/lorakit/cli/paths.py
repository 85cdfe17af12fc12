"""Paths given on the command line that must stay inside a folder (reliability: names a
CLI or a server receives cannot escape their folder)."""

from __future__ import annotations

from pathlib import Path

from .args import ArgError


def inside(root: Path, name: str, key: str) -> Path:
    """``root / name``, refused unless it stays inside ``root`` after resolving ``..`` and symlinks.

    Raises:
        ArgError: ``name`` is empty or absolute, has a ``..`` part, or resolves outside ``root``.
    """
    rel = Path(name)
    if not name or rel.is_absolute() or rel.anchor or ".." in rel.parts:
        raise ArgError(f"{key}={name!r} must be a relative path inside {root} (no '..', not absolute)")
    path = root / rel
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise ArgError(f"{key}={name!r} resolves to {path.resolve()}, outside {base}")
    return path
