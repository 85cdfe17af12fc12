"""Launching ``lorakit hf train`` under ``torchrun`` on the CPU (gloo, 127.0.0.1), bounded in time;
shared by tests/hf/test_ddp.py and bench/hf_ddp.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lorakit

WEIGHTS = "adapter_model.safetensors"

SRC = Path(lorakit.__file__).resolve().parents[1]  # the lorakit under test, for the subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int, args: list[str], timeout: float = 120, threads: int = 1,
             script: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``torchrun --nproc_per_node=nproc -m lorakit.cli hf train ARGS`` (or ``script ARGS``) with
    ``threads`` per process.

    Raises:
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds (its processes are killed).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(SRC), "GLOO_SOCKET_IFNAME": "lo",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
              "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    cmd = [*launch, *([str(script)] if script else ["-m", "lorakit.cli", "hf", "train"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def losses(out: Path) -> list[float]:
    """The loss curve held by run ``out``'s last checkpoint."""
    from lorakit.hf.train import latest_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return list(json.loads((ckpt / "state.json").read_text())["losses"])


def assert_same_run(many: Path, one: Path) -> None:
    """Run ``many`` (several processes) trained as run ``one`` (one process, the same global batch).

    Same samples per step, the loss normalised by the global token count, the gradients averaged
    across processes: only the fp32 summation order differs (~1e-7 relative per op, grown by the
    run's Adam steps; on the tests' tiny models the losses differed by under 1e-6 relative with
    DDP and 7e-8 with FSDP2). rtol 1e-4 leaves room, while a wrong sample, a lost or doubled
    gradient or a lost optimizer state on resume moves the loss by 1e-3 or more. The adapter
    weights (moved by 8 steps of lr 1e-2) agree to the same relative rounding (FSDP2's came within
    11 % of the tolerance).
    """
    import safetensors.torch
    import torch

    got, want = torch.tensor(losses(many)), torch.tensor(losses(one))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0, msg=lambda m: f"{m}\n{got}\n{want}")
    a, b = (safetensors.torch.load((run / "adapter" / WEIGHTS).read_bytes()) for run in (many, one))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
