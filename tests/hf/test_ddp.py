"""``torchrun --nproc_per_node=2 lorakit hf train`` (DDP, gloo on the CPU), issue 15: the loss curve
equals a 1-process run with the same global batch, only the main process writes the files and
reports, and a 2-process run stopped and resumed continues on that curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.hf.train import latest_checkpoint, train

from .ddp import torchrun
from .runs import NUMS, cli_args, opts, tensors, write_jsonl

W = "adapter_model.safetensors"


def _losses(out: Path) -> list[float]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return list(json.loads((ckpt / "state.json").read_text())["losses"])


def test_two_processes_equal_one_with_the_same_global_batch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # 16 training records: 4 global batches of 4 per epoch, split 2 + 2 (no padded last batch).
    recs: list[object] = [{"prompt": f"repeat {a} {b} :", "response": f"{a} {b}"} for a in NUMS[:4] for b in NUMS[:4]]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "repeat five one :", "response": "five one"}])
    model = tiny_models["llama"]
    # dropout 0: each process draws its own dropout masks, a single process draws other ones
    run = {"dropout": 0.0, "epochs": 2, "eval": str(ev), "save_every": 2}
    one = train(opts(model, data, tmp_path / "one", batch_size=4, **run))
    # 2 processes of batch 2, stopped after 3 of the 8 steps, then resumed (2 launches: ~20 s each when idle).
    two = tmp_path / "two"
    stopped = torchrun(2, cli_args(model, data, two, batch_size=2, stop_after=3, **run))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    said = stopped.stdout.splitlines()
    assert sum("trainable parameters" in s for s in said) == 1, said  # the main process alone reports
    assert [s for s in said if s.startswith("stopped")] == [
        f"stopped (resume=True continues): 3/8 steps; adapter in {two / 'adapter'}"
    ], said
    resumed = torchrun(2, cli_args(model, data, two, batch_size=2, resume=True, **run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((two / "metrics.json").read_text())
    assert (summary["processes"], summary["steps"]) == (2, one["steps"]) == (2, 8)
    # Same samples per step (each epoch's order split into consecutive per-process batches), the loss
    # normalised by the global token count: only the summation order differs (each process sums its half,
    # the all-reduce adds the halves). fp32 rounding (~1e-7 relative) grown by 8 Adam steps: measured
    # below 1e-6 here; 1e-4 leaves room, and a wrong sample, a lost optimizer state or a doubled gradient
    # on resume moves the loss by 1e-3 or more.
    got, want = torch.tensor(_losses(two)), torch.tensor(_losses(tmp_path / "one"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0, msg=lambda m: f"{m}\n{got}\n{want}")
    a, b = tensors(two / "adapter", W), tensors(tmp_path / "one" / "adapter", W)
    assert a.keys() == b.keys()
    for k in a:  # the weights moved by 8 steps of lr 1e-2: they agree to the same relative rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # One adapter (written by the main process), an RNG file per process.
    ckpt = latest_checkpoint(two)
    assert ckpt is not None and sorted(p.name for p in ckpt.iterdir()) == [
        "adapter", "optimizer.json", "optimizer.safetensors", "rng-0.safetensors", "rng-1.safetensors", "run.json",
        "state.json", "trainer_state.json",
    ]  # fmt: skip
