"""``hf train loraplus_ratio=...``: LoRA+ (B factors at ``lr * ratio``) on a tiny model, its
checkpointed optimizer, its resume, and its bad values on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.hf.resume import ResumeMismatchError
from lorakit.hf.train import train

from .runs import OPTS, causal_data, cli_args, opts, tensors

W = "adapter_model.safetensors"


def _groups(out: Path, step: int) -> list[dict[str, object]]:
    meta = json.loads((out / "checkpoints" / f"step-{step:06d}" / "optimizer.json").read_text())
    return list(meta["param_groups"])


def test_loraplus_ratio_trains_b_at_ratio_times_the_lr(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = causal_data(tmp_path / "d.jsonl")
    lr = float(OPTS["lr"])  # type: ignore[arg-type]
    train(opts(tiny_models["llama"], data, tmp_path / "plain", stop_after=1))
    train(opts(tiny_models["llama"], data, tmp_path / "plus", stop_after=1, loraplus_ratio=16.0))
    # the checkpoint after step 1 holds the lrs of step 2 (Trainer's scheduler has stepped): 9/10 of the start
    assert [g["lr"] for g in _groups(tmp_path / "plain", 1)] == pytest.approx([lr * 0.9], rel=1e-12)
    plus_groups = _groups(tmp_path / "plus", 1)
    # A factors, B factors (causal: nothing else trains)
    assert [g["lr"] for g in plus_groups] == pytest.approx([lr * 0.9, lr * 16.0 * 0.9], rel=1e-12)
    plain, plus = tensors(tmp_path / "plain" / "adapter", W), tensors(tmp_path / "plus" / "adapter", W)
    b_keys = [k for k in plain if k.endswith("lora_B.weight")]
    assert b_keys and plain.keys() == plus.keys()
    for k in plain:
        if k in b_keys:
            # B starts at 0 and Adam's first step is -lr * m/(sqrt(v)+eps) with the same m, v in both runs
            # (same seed, same data, same dropout masks); 16 is a power of two, so lr * 16 scales the step
            # exactly: bitwise 16x.
            assert plain[k].abs().max() > 0 and torch.equal(plus[k], 16.0 * plain[k]), k
        else:  # A: its gradient is 0 while B = 0, so neither run moved it
            assert torch.equal(plus[k], plain[k]), k


def test_loraplus_resume_continues_the_uninterrupted_run_and_refuses_another_ratio(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    data = causal_data(tmp_path / "d.jsonl")
    whole = train(opts(tiny_models["llama"], data, tmp_path / "whole", loraplus_ratio=8.0))
    cut = tmp_path / "cut"
    train(opts(tiny_models["llama"], data, cut, loraplus_ratio=8.0, stop_after=3))
    with pytest.raises(ResumeMismatchError, match=r"loraplus_ratio: saved 8.0, now None"):
        train(opts(tiny_models["llama"], data, cut, resume=True))
    resumed = train(opts(tiny_models["llama"], data, cut, loraplus_ratio=8.0, resume=True))
    assert resumed["steps"] == whole["steps"] and resumed["final_train_loss"] == whole["final_train_loss"]
    a, b = tensors(tmp_path / "whole" / "adapter", W), tensors(cut / "adapter", W)
    assert all(torch.equal(a[k], b[k]) for k in a)  # each group's lr decays from its own start, resumed too
    last = whole["steps"]
    assert _groups(cut, last) == _groups(tmp_path / "whole", last)


@pytest.mark.parametrize("value", ["0", "-2", "nan", "big"])
def test_a_bad_loraplus_ratio_is_one_line_exit_2(
    value: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out), f"loraplus_ratio={value}"]) == 2
    shown = {"0": "0", "-2": "-2", "nan": "'nan'", "big": "'big'"}[value]
    assert capsys.readouterr().err == (
        "lorakit hf: error: hf train: loraplus_ratio must be a finite number > 0 (B's lr / A's lr; 16 in the "
        f"LoRA+ paper) or None, got {shown}\n"
    )
    assert not out.exists()


def test_loraplus_ratio_on_the_command_line(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out, stop_after=1), "loraplus_ratio=4"]) == 0
    lr = float(OPTS["lr"])  # type: ignore[arg-type]
    assert [g["lr"] for g in _groups(out, 1)] == pytest.approx([lr * 0.9, lr * 4 * 0.9], rel=1e-12)  # step 2's
