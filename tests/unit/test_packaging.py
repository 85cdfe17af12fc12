"""What the built package ships: a wheel really built from a copy of this checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_py_typed(tmp_path) -> None:
    # PEP 561: without lorakit/py.typed in the installed package, users' type checkers ignore its annotations.
    assert (ROOT / "src" / "lorakit" / "py.typed").is_file()
    # A clean copy: a build/ folder left in the checkout would feed the wheel stale files.
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("lorakit-*.whl")
    assert "lorakit/py.typed" in zipfile.ZipFile(wheel).namelist()
