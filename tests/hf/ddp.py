"""Launching ``lorakit hf train`` under ``torchrun`` on the CPU (gloo, 127.0.0.1), bounded in time;
shared by tests/hf/test_ddp.py and bench/hf_ddp.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lorakit

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
