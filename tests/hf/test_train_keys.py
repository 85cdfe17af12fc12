"""``lorakit hf train`` on transformers.Trainer (issue 15): the new keys (precision, grad_accum,
warmup, schedule, max_steps, dora, device, report_to), each validated with a typed error."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.hf.train import latest_checkpoint, train

from .runs import causal_data, cli_args, opts, tensors

W = "adapter_model.safetensors"


def _losses(out: Path) -> list[float]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return list(json.loads((ckpt / "state.json").read_text())["losses"])


def _lrs(out: Path) -> list[float]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    return [h["learning_rate"] for h in json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_autocast_both_train(precision: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """bf16 on the CPU is autocast: the base and the adapter stay fp32, the loss still falls."""
    out = tmp_path / precision
    train(opts(tiny_models["llama"], causal_data(tmp_path / "d.jsonl"), out, epochs=4, lr=2e-2,
               precision=precision, device="cpu"))  # fmt: skip
    losses = _losses(out)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.98 * sum(losses[:5]), losses  # fp32: -5% over these 20 steps
    assert {v.dtype for v in tensors(out / "adapter", W).values()} == {torch.float32}


def test_grad_accum_equals_the_larger_batch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """batch_size=2 x grad_accum=2 is the run of batch_size=4: the same 4 examples per step, the loss
    normalised by the step's token count (Trainer's num_items_in_batch). Only the summation order of the
    fp32 loss and gradients differs: losses agree to 1e-5 relative over these 10 steps."""
    data = causal_data(tmp_path / "d.jsonl")
    train(opts(tiny_models["llama"], data, tmp_path / "big", batch_size=4, dropout=0.0))
    train(opts(tiny_models["llama"], data, tmp_path / "acc", batch_size=2, grad_accum=2, dropout=0.0))
    big, acc = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert len(big) == len(acc) == 10
    torch.testing.assert_close(torch.tensor(acc), torch.tensor(big), rtol=1e-5, atol=0)


def test_warmup_cosine_and_max_steps(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    s = train(opts(tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), out, max_steps=4, warmup=2,
                   schedule="cosine", lr=1e-2))  # fmt: skip
    assert (s["steps"], s["total_steps"]) == (4, 4)
    # the lr each step used: linear warmup 0 -> lr over 2 steps, then half a cosine to 0 over the other 2
    assert _lrs(out) == pytest.approx([0.0, 5e-3, 1e-2, 5e-3], rel=1e-9, abs=1e-15)
    assert latest_checkpoint(out) == out / "checkpoints" / "step-000004"  # the last step is saved


def test_dora_trains_and_a_changed_variant_is_refused_on_resume(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    train(opts(tiny_models["llama"], data, out, dora=True, stop_after=2))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    with pytest.raises(
        ConfigError,
        match=r"3 setting\(s\) differ.*r: saved 4, now 8; alpha: saved 4.0, now 8.0; dora: saved True, now False",
    ):
        train(opts(tiny_models["llama"], data, out, r=8, resume=True))
    with pytest.warns(UserWarning, match="max_steps changed from 0 to 3"):
        assert train(opts(tiny_models["llama"], data, out, dora=True, max_steps=3, resume=True))["steps"] == 3


def test_start_line_names_trainable_and_total_parameters(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), out,
                                          stop_after=1)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    n, total = m["trainable_parameters"], m["total_parameters"]
    share = f"({100 * n / total:.3f}%)"
    line = f"lorakit hf train: {n:,} trainable parameters of {total:,} {share} on cpu, fp32, 1 process(es)"
    assert line in said.splitlines(), said
    assert 0 < m["trainable_parameters"] < m["total_parameters"]


BAD_KEYS = {
    "grad_accum=0": "grad_accum must be an int > 0, got 0",
    "warmup=-1": "warmup must be an int >= 0, got -1",
    "max_steps=1.5": "max_steps must be an int >= 0, got 1.5",
    "schedule=step": "schedule must be linear or cosine, got 'step'",
    "precision=fp8": "precision must be fp32, bf16 or fp16, got 'fp8'",
    "device=tpu": "device must be auto, cpu or cuda, got 'tpu'",
    "report_to=wandb": "report_to must be none or tensorboard, got 'wandb'",
    "dora=maybe": "dora must be True or False, got 'maybe'",
    "quantize=nf5": "quantize must be none, nf4, fp4 or int8, got 'nf5'",
    "precision=fp16 device=cpu": "precision=fp16 needs a CUDA device (device is cpu); use precision=bf16 or fp32",
}
if not torch.cuda.is_available():
    BAD_KEYS["device=cuda"] = "device=cuda, but torch finds no CUDA device (torch.cuda.is_available() is False)"
if importlib.util.find_spec("tensorboard") is None:
    BAD_KEYS["report_to=tensorboard"] = "report_to=tensorboard needs the tensorboard package (pip install tensorboard)"


@pytest.mark.parametrize("tokens", sorted(BAD_KEYS))
def test_new_key_bad_value_is_one_line_exit_2(
    tokens: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out), *tokens.split()]) == 2
    assert capsys.readouterr().err == f"lorakit hf: error: hf train: {BAD_KEYS[tokens]}\n"
    assert not out.exists()


def test_a_bf16_checkpoint_trains_fp32_adapters(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue 15: transformers 5 loads a checkpoint in its own dtype; a bf16 base gave bf16 adapters
    (AdamW on bf16 weights; fp16's GradScaler refuses fp16 ones). The base is now loaded in fp32."""
    folder = tmp_path / "bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).to(torch.bfloat16)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(folder)
    out = tmp_path / "run"
    train(opts(folder, causal_data(tmp_path / "d.jsonl"), out, stop_after=2, precision="bf16", device="cpu"))
    assert {v.dtype for v in tensors(out / "adapter", W).values()} == {torch.float32}
    state = tensors(latest_checkpoint(out) or out, "optimizer.safetensors")
    assert {v.dtype for k, v in state.items() if k.endswith("exp_avg")} == {torch.float32}
