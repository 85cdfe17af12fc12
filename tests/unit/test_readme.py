"""Every ```python block in README.md runs as written.

Blocks fenced as ```py need files this machine cannot have (yolo26n.pt, a user's data);
the same calls run in tests/yolo on models built from YAML.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks write files (runs/...) relative to the working directory
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
