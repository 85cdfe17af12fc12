"""No core file over 500 lines (issue 14): a file that grows past it holds more than one
idea and is split by idea. The integrations (lorakit/hf, lorakit/yolo) are not core."""

from __future__ import annotations

from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).resolve().parent
LIMIT = 500


def test_no_core_file_is_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] not in ("hf", "yolo")
    }
    assert "io.py" in sizes and "cli/args.py" in sizes
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"core files over {LIMIT} lines: {over}"
