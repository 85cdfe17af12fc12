"""``torchrun --nproc_per_node=2 lorakit hf train`` (DDP, gloo on the CPU), issue 15: the loss curve
equals a 1-process run with the same global batch, only the main process writes the files and
reports, and a 2-process run stopped and resumed continues on that curve."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.hf.train import latest_checkpoint, train

from .ddp import assert_same_run, torchrun
from .runs import NUMS, cli_args, opts, write_jsonl


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
    # Each epoch's order is split into consecutive per-process batches; the all-reduce adds the halves.
    assert_same_run(two, tmp_path / "one")
    # One adapter (written by the main process), an RNG file per process.
    ckpt = latest_checkpoint(two)
    assert ckpt is not None and sorted(p.name for p in ckpt.iterdir()) == [
        "adapter", "optimizer.json", "optimizer.safetensors", "rng-0.safetensors", "rng-1.safetensors", "run.json",
        "state.json", "trainer_state.json",
    ]  # fmt: skip
