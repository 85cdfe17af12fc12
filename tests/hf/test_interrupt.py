"""Ctrl-C during ``lorakit hf train`` (issue item 10), for real: the command in a subprocess, SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorakit
from lorakit.hf.train import latest_checkpoint, train

from .runs import causal_data, cli_args, leftovers, opts

SRC = Path(lorakit.__file__).resolve().parents[1]  # the lorakit under test, for the subprocess


SIGNALS = {"SIGINT": (signal.SIGINT, 130, "interrupted"), "SIGTERM": (signal.SIGTERM, 143, "terminated (SIGTERM)")}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_ctrl_c_names_the_last_checkpoint_and_resume_continues(
    name: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Issue item 10: Ctrl-C during hf train printed a raw KeyboardInterrupt traceback. Now: exit
    130, one line naming the last checkpoint, no temporary file left, and resume=True continues.
    A checkpoint (and loss.png) is written every step, so the signal often lands mid-write.
    Issue 15: SIGTERM (a scheduler's stop) alike, exit 143."""
    signum, code, how = SIGNALS[name]
    gpt2, data, out = tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    run = {"epochs": 1000, "save_every": 1}  # 5000 steps: far more than the test waits for
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "lorakit.cli", "hf", "train", *cli_args(gpt2, data, out, **run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None or int(latest_checkpoint(out).name[5:]) < 2:  # type: ignore[union-attr]
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    said = [line for line in stderr.splitlines() if how in line]
    assert said == [f"lorakit hf train: {how}; the last checkpoint is {ckpt} (resume=True continues from it)"]
    assert leftovers(out) == []
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert train(opts(gpt2, data, out, stop_after=1, resume=True, **run))["steps"] == step + 1
