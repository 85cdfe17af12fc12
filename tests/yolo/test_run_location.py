"""Where ``lorakit yolo train`` puts its run, and whose Ultralytics settings hold (issue 13 item 2).

Ultralytics' default ``runs_dir`` is ``<git root of its install folder>/runs``: with a virtual
environment inside a clone, every run landed in ``<clone>/runs`` whatever the current folder.
And the CLI's private config dir (:mod:`lorakit.yolo.offline`) started from Ultralytics'
defaults, so the user's own settings (``runs_dir``, ``tensorboard``) were ignored.

The CLI runs here in a subprocess, as a user runs it: from a fresh folder, with ``HOME`` and
``XDG_CONFIG_HOME`` in a temp folder (holding the user's ``settings.json`` or not), without the
test session's ``YOLO_CONFIG_DIR``, and without the variables by which Ultralytics detects a test
run (it then puts runs under its own ``tests/tmp/runs``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from yolo_helpers import NETWORK_REFUSED

pytestmark = pytest.mark.slow

# Runs `lorakit ARGS...`, then reports the Ultralytics settings it ran with.
_RUN_CLI = (
    NETWORK_REFUSED
    + """
from lorakit.cli import main
code = main(sys.argv[1:])
from ultralytics.utils import SETTINGS
print(f"SETTINGS tensorboard={SETTINGS['tensorboard']} runs_dir={SETTINGS['runs_dir']}")
raise SystemExit(code)
"""
)
# Set by pytest or CI; Ultralytics then sends runs to its own tests/tmp/runs (cfg.get_save_dir).
_TEST_RUN_VARS = ("YOLO_CONFIG_DIR", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "GITHUB_WORKFLOW", "RUNNER_OS")


def _train(tmp: Path, data: Path, name: str) -> subprocess.CompletedProcess[str]:
    """``lorakit yolo train`` of a tiny run, from ``tmp/work``, with the user's config in ``tmp/xdg``."""
    env = {k: v for k, v in os.environ.items() if k not in _TEST_RUN_VARS}
    env |= {"HOME": str(tmp / "home"), "XDG_CONFIG_HOME": str(tmp / "xdg"), "TMPDIR": str(tmp / "tmp")}
    env["OMP_NUM_THREADS"] = "1"
    for d in ("home", "tmp", "work"):
        (tmp / d).mkdir(exist_ok=True)
    argv = ["yolo", "train", "model=yolo26n.yaml", f"data={data}", "epochs=1", "imgsz=32", "batch=4", "nbs=4"]
    argv += ["workers=0", "plots=False", "device=cpu", "r=4", f"name={name}"]
    return subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *argv], env=env, cwd=tmp / "work", capture_output=True, text=True, timeout=300
    )


def _adapter_dir(proc: subprocess.CompletedProcess[str]) -> Path:
    m = re.search(r"adapter folders: (\S+) \(best\)", proc.stdout)
    assert m, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(m.group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorakit.yolo import make_dataset

    return make_dataset(tmp_path_factory.mktemp("where_data"), n_train=4, n_val=4, imgsz=32, seed=0)


def test_without_user_settings_the_run_lands_under_the_current_folder(tmp_path: Path, data: Path) -> None:
    name = f"where-{uuid.uuid4().hex[:8]}"  # unique: on the old code the run lands outside tmp_path
    proc = _train(tmp_path, data, name)
    adapter = _adapter_dir(proc) if proc.returncode == 0 else None
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "network access attempted" not in proc.stderr
        assert adapter == tmp_path / "work" / "runs" / "detect" / name / "weights" / "best_adapter"
        assert (adapter.parent / "best.pt").is_file()
        assert not (tmp_path / "xdg" / "Ultralytics").exists()  # no user settings were made
    finally:  # a run that landed elsewhere (the old code: <git root of ultralytics' install>/runs) goes
        if adapter is not None and adapter.parent.parent.name == name and tmp_path not in adapter.parents:
            shutil.rmtree(adapter.parent.parent)


def test_the_users_settings_hold_and_their_file_is_left_alone(tmp_path: Path, data: Path) -> None:
    from ultralytics.utils import SETTINGS

    runs_dir = tmp_path / "my_runs"
    user_dir = tmp_path / "xdg" / "Ultralytics"
    user_dir.mkdir(parents=True)
    user = {**SETTINGS.defaults, "runs_dir": str(runs_dir), "tensorboard": True, "sync": True}
    (user_dir / "settings.json").write_text(json.dumps(user, indent=2))
    before = (user_dir / "settings.json").read_bytes()

    name = f"where-{uuid.uuid4().hex[:8]}"
    proc = _train(tmp_path, data, name)
    adapter = _adapter_dir(proc) if proc.returncode == 0 else None
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "network access attempted" not in proc.stderr
        assert adapter == runs_dir / "detect" / name / "weights" / "best_adapter"
        assert f"SETTINGS tensorboard=True runs_dir={runs_dir}" in proc.stdout
        assert (user_dir / "settings.json").read_bytes() == before  # read, never written
        assert sorted(p.name for p in user_dir.iterdir()) == ["settings.json"]  # no fonts or files added
        assert not (tmp_path / "work" / "runs").exists()
    finally:
        if adapter is not None and adapter.parent.parent.name == name and tmp_path not in adapter.parents:
            shutil.rmtree(adapter.parent.parent)


def test_a_relative_project_is_under_the_current_folders_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ultralytics puts a relative ``project`` under ``runs_dir/<task>``; with its default ``runs_dir``
    (this session's settings) that is ``./runs/<task>/<project>``, not the clone's."""
    from lorakit.yolo.offline import runs_project

    monkeypatch.chdir(tmp_path)
    assert runs_project("segment", {"project": "mine"})["project"] == str(tmp_path / "runs" / "segment" / "mine")
    assert runs_project("detect", {})["project"] == str(tmp_path / "runs" / "detect")
    assert runs_project("detect", {"project": "/abs/p"}) == {"project": "/abs/p"}
    assert runs_project("detect", {"resume": True}) == {"resume": True}
