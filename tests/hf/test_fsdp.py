"""``torchrun --nproc_per_node=2 lorakit hf train fsdp=True`` (FSDP2 ``fully_shard``, gloo on the CPU),
issue 15: the loss curve equals a 1-process run with the same global batch, the main process alone
reports and writes the adapter (gathered whole from the shards), each process keeps its own shard of
the optimizer state, and a stopped run resumed continues on that curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch

from lorakit.cli import main
from lorakit.hf.resume import ResumeMismatchError, check_resume
from lorakit.hf.train import latest_checkpoint, load_folder, train
from lorakit.io import load_adapter

from .ddp import assert_same_run, torchrun
from .runs import NUMS, causal_data, cli_args, opts, write_jsonl

TWICE = Path(__file__).with_name("train_twice.py")


def test_fsdp_two_processes_equal_one_and_resume(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # 16 training records: 4 global batches of 4 per epoch, split 2 + 2 (as tests/hf/test_ddp.py).
    recs: list[object] = [{"prompt": f"repeat {a} {b} :", "response": f"{a} {b}"} for a in NUMS[:4] for b in NUMS[:4]]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "repeat five one :", "response": "five one"}])
    model = tiny_models["llama"]
    run = {"dropout": 0.0, "epochs": 2, "eval": str(ev), "save_every": 2}  # dropout 0: masks differ per process
    one = train(opts(model, data, tmp_path / "one", batch_size=4, **run))
    # 2 processes of batch 2, stopped after 3 of the 8 steps and resumed, in one launch (train_twice.py).
    two = tmp_path / "two"
    done = torchrun(2, ["3", *cli_args(model, data, two, batch_size=2, fsdp=True, **run)], timeout=300, script=TWICE)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout.splitlines()
    assert sum("trainable parameters" in s for s in said) == 2, said  # the main process alone reports, per run
    ends = [s for s in said if s.startswith(("stopped", "done"))]
    assert len(ends) == 2 and ends[0] == f"stopped (resume=True continues): 3/8 steps; adapter in {two / 'adapter'}"
    assert ends[1].startswith("done: 8/8 steps;"), said
    summary = json.loads((two / "metrics.json").read_text())
    assert (summary["processes"], summary["steps"]) == (2, one["steps"]) == (2, 8)
    # FSDP's reduce-scatter averages the gradients as DDP's all-reduce does. The adapter file is whole
    # (gathered from the shards): it loads strictly onto the unsharded base below.
    assert_same_run(two, tmp_path / "one")
    report = load_adapter(load_folder(model), two / "adapter")
    assert report.base_checked and report.base_matches
    ckpt = latest_checkpoint(two)
    assert ckpt is not None and sorted(p.name for p in ckpt.iterdir()) == [
        "adapter", "optimizer-0.safetensors", "optimizer-1.safetensors", "optimizer.json", "rng-0.safetensors",
        "rng-1.safetensors", "run.json", "state.json", "trainer_state.json",
    ]  # fmt: skip
    # Each process saved its own shard of AdamW's two moments: together they hold each value once.
    shards = [safetensors.torch.load_file(ckpt / f"optimizer-{r}.safetensors") for r in (0, 1)]
    sizes = [sum(v.numel() for k, v in s.items() if k.endswith(("exp_avg", "exp_avg_sq"))) for s in shards]
    assert sum(sizes) == 2 * one["trainable_parameters"] and min(sizes) > 0, sizes
    # A resume that would not shard is refused, as a changed process count is.
    saved = json.loads((ckpt / "run.json").read_text())
    assert saved["fsdp"] is True
    with pytest.raises(ResumeMismatchError) as e:
        check_resume(ckpt, {**saved, "fsdp": False})
    assert e.value.changes == {"fsdp": (True, False)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["fsdp=True"], "fsdp=True shards the model across the processes of a torchrun launch, but this run has 1"),
        (["fsdp=True", "quantize=nf4"], "fsdp=True cannot shard a quantised base (quantize='nf4'"),
        (["fsdp=maybe"], "fsdp must be True or False, got 'maybe'"),
    ],
)
def test_fsdp_refused_where_it_cannot_shard(
    extra: list[str], message: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
