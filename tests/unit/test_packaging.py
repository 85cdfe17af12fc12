"""What the built package ships: a wheel really built from this checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_py_typed(tmp_path) -> None:
    # PEP 561: without lorakit/py.typed in the installed package, users' type checkers ignore its annotations.
    assert (ROOT / "src" / "lorakit" / "py.typed").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("lorakit-*.whl")
    assert "lorakit/py.typed" in zipfile.ZipFile(wheel).namelist()
