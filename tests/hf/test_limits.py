"""``hf train`` at the model's limits (issue item 6): records longer than the model's context,
a max_len that leaves nothing to train on, a loss that turns NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.errors import ConfigError, NonFiniteError
from lorakit.hf.train import latest_checkpoint, train

from .runs import NUMS, causal_data, leftovers, opts, tensors, write_jsonl


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_max_len_is_clamped_to_the_model_context(arch: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue item 6: the default max_len 256 on a model of 64 positions, with a record of ~100 tokens,
    crashed GPT-2 with a raw IndexError; now max_len is clamped to 64 with a warning saying so."""
    long = {"prompt": "repeat " + " ".join(NUMS * 20) + " :", "response": "one two"}
    data = write_jsonl(tmp_path / "long.jsonl", [long] + [{"prompt": f"repeat {a} :", "response": a} for a in NUMS])
    out = tmp_path / "run"
    note = "max_len 256 is more than the model's context of 64 positions; using max_len=64"
    with pytest.warns(UserWarning, match=note):
        summary = train(opts(tiny_models[arch], data, out, max_len=256, eval_fraction=0.0, epochs=1, batch_size=6))
    assert summary["steps"] == 1 and math.isfinite(summary["final_train_loss"])
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and '"max_len": 64' in (ckpt / "run.json").read_text()


def test_max_len_without_a_response_token_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue item 6: max_len=1 trained on NaN losses and reported success; now it is refused, naming it."""
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    with pytest.raises(ConfigError, match="max_len=1 leaves no response token to train on"):
        train(opts(tiny_models["gpt2"], data, out, max_len=1))
    assert not out.exists()
    summary = train(opts(tiny_models["gpt2"], data, out, max_len=2, stop_after=2))  # the smallest that trains
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])


def test_nan_loss_stops_at_once_keeping_the_last_checkpoint(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue item 6: a NaN loss used to be found only when saving (a raw error, a .step-*.tmp folder
    left). Resumed with an lr of 1e30 the adapter blows up within a few steps: the run stops with a
    typed error naming the step and the loss, before that step reaches the disk."""
    gpt2, data, out = tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    train(opts(gpt2, data, out, stop_after=2))
    good = out / "checkpoints" / "step-000002"
    saved = (good / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match="lr changed"), pytest.raises(NonFiniteError) as info:
        train(opts(gpt2, data, out, lr=1e30, resume=True))
    err = info.value
    step, loss = getattr(err, "step", None), getattr(err, "loss", None)
    assert isinstance(step, int) and 2 < step <= 5 and isinstance(loss, float), (step, loss)
    assert f"step {step}" in str(err) and str(good) in str(err)
    assert getattr(err, "checkpoint", None) == good
    if not getattr(err, "adapter", False):
        assert not math.isfinite(loss) and f"is {loss}" in str(err)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert leftovers(out) == []
    assert (good / "adapter" / "adapter_model.safetensors").read_bytes() == saved
    a, b = tensors(good / "adapter", "adapter_model.safetensors"), tensors(out / "adapter", "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # out/adapter: still step 2's
    # The checkpoint is intact: it loads (finite, strict) and the run continues from it.
    lorakit.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(gpt2), good / "adapter")
    assert train(opts(gpt2, data, out, stop_after=1, resume=True))["steps"] == 3
