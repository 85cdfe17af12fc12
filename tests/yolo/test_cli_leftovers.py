"""``lorakit yolo`` leaves nothing in the temp folder (issue item 11).

Each call used to leave a 1.5 MB ``lorakit-yolo-*`` folder (the private Ultralytics
config dir of :mod:`lorakit.yolo.offline`) in the system temp folder. The CLI runs
here in a subprocess, as a user runs it: with ``TMPDIR`` pointed at a fresh folder
and no ``YOLO_CONFIG_DIR`` (the test session's own is removed from its environment),
so the CLI makes its own config dir there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from yolo_helpers import NETWORK_REFUSED

pytestmark = pytest.mark.slow

# Runs `lorakit ARGS...`, then reports the config dir it used; CRASH=1 ends the process with an
# uncaught exception after the call (the exit path of a crash).
_RUN_CLI = (
    NETWORK_REFUSED
    + """
import os
from lorakit.cli import main
code = main(sys.argv[1:])
print(f"CONFIG_DIR={os.environ.get('YOLO_CONFIG_DIR')}", file=sys.stderr)
if os.environ.get("CRASH"):
    raise RuntimeError("an uncaught error after the call")
raise SystemExit(code)
"""
)


def _lorakit(argv: list[str], tmp: Path, cwd: Path, crash: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "YOLO_CONFIG_DIR"}
    env |= {"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", **({"CRASH": "1"} if crash else {})}
    return subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


CALLS = {  # id -> (argv after `lorakit yolo`, exit code, crash after the call)
    "success": (["predict", "model=yolo26n.yaml", "source={img}", "imgsz=64", "save=False", "device=cpu"], 0, False),
    "typed-error": (["val", "model=yolo26n.yaml", "data={no_images}", "imgsz=64", "device=cpu"], 2, False),
    "crash": (["predict", "model=yolo26n.yaml", "source={img}", "imgsz=64", "save=False", "device=cpu"], 1, True),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_no_lorakit_yolo_folder_is_left_in_the_temp_folder(call: tuple[list[str], int, bool], tmp_path: Path) -> None:
    """Issue item 11: after a successful call, a call that fails with a typed error and a process
    that dies of an uncaught error, the ``lorakit-yolo-*`` config dir made in TMPDIR is gone."""
    argv, want, crash = call
    tmp, work = tmp_path / "tmp", tmp_path / "work"
    tmp.mkdir()
    work.mkdir()
    no_images = work / "no_images.yaml"
    no_images.write_text(f"path: {work / 'nowhere'}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n")
    fill = {"img": _image(work / "img.jpg"), "no_images": no_images}
    proc = _lorakit(["yolo", *(a.format(**fill) for a in argv)], tmp, work, crash)

    assert proc.returncode == want, proc.stderr[-3000:]
    assert "network access attempted" not in proc.stderr
    used = [line.split("=", 1)[1] for line in proc.stderr.splitlines() if line.startswith("CONFIG_DIR=")]
    assert len(used) == 1 and Path(used[0]).parent == tmp and Path(used[0]).name.startswith("lorakit-yolo-")
    assert not list(tmp.glob("lorakit-yolo-*")), sorted(tmp.iterdir())
