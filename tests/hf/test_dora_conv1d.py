"""DoRA on transformers' Conv1D (GPT-2), PEFT as the oracle both ways; fused-projection parts refuse DoRA.

Tolerance 1e-5: fp32, O(1) logits, a few ulps per layer over GPT-2's ~10 stacked layers (as the Linear tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import TargetError

from ..integration.test_dora_peft import _grads, _move_magnitudes
from .models import batch, gpt2, outputs
from .test_parts_and_peft import peft_logits

peft = pytest.importorskip("peft")
IDS = batch("gpt2")["input_ids"]


def test_gpt2_dora_both_ways_and_same_gradients(tmp_path: Path) -> None:
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          init_lora_weights=False, use_dora=True)  # fmt: skip
    pm = peft.get_peft_model(gpt2(), cfg)
    _move_magnitudes(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = gpt2()
    lorakit.load_adapter(m, tmp_path / "peft")
    with torch.no_grad():
        theirs = pm.eval()(input_ids=IDS).logits
    assert not torch.allclose(theirs, outputs(gpt2(), {"input_ids": IDS}), atol=1e-3)
    torch.testing.assert_close(outputs(m, {"input_ids": IDS}), theirs, rtol=1e-5, atol=1e-5)
    lorakit.save_adapter(m, tmp_path / "ours")
    torch.testing.assert_close(peft_logits(tmp_path / "ours", IDS, gpt2()), theirs, rtol=1e-5, atol=1e-5)
    for model in (pm, m):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    a, b = _grads(pm), _grads(m)
    assert set(a) == set(b) and len(a) == 18  # 6 layers (attn c_attn, c_proj; mlp c_proj) x A, B, m
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)


def test_parts_of_a_fused_projection_refuse_dora() -> None:
    model = gpt2()
    paths = lorakit.hf.target_fused(model, "c_attn", parts=("q", "v"))
    with pytest.raises(TargetError, match=r"c_attn: DoRA is not implemented for layer type PartsConv1D"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets=paths, dora=True))


def test_hf_lora_config_takes_dora_under_both_names() -> None:
    assert lorakit.hf.lora_config(gpt2(), use_dora=True) == lorakit.hf.lora_config(gpt2(), dora=True)
    assert lorakit.hf.lora_config(gpt2(), dora=True).dora
