"""PEFT as the oracle for DoRA, both ways: PEFT's DoRA files load in lorakit and lorakit's in PEFT, same outputs.

Tolerance: fp32 models whose outputs are O(1); the two libraries compute the same terms in a
slightly different order (PEFT: ``(m/n - 1) base(x) + ...``, lorakit: ``(m/n)(W x + ...)``), a few
ulps (1e-7) per layer, so 1e-5 leaves room for the ~10 stacked layers of the tiny Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.io import load_adapter, save_adapter

from ..unit.io_models import IDS, make_net
from .test_peft_interop import logits, peft_load, tiny_llama

peft = pytest.importorskip("peft")
torch.set_num_threads(1)

NET_TARGETS = ["emb", "conv", "lin"]  # Net's gconv is grouped: DoRA refuses it (tests/unit/test_dora.py)


def _move_magnitudes(model: torch.nn.Module) -> None:
    """Magnitudes away from their init (the norms), as training moves them: else m/n = 1 on load."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))


def test_peft_dora_loads_in_lorakit_and_back_custom_layers(tmp_path: Path) -> None:
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=NET_TARGETS, init_lora_weights=False, use_dora=True)
    pm = peft.get_peft_model(make_net(), cfg).eval()
    _move_magnitudes(pm)
    with torch.no_grad():
        y = pm(IDS)
        assert not torch.allclose(y, make_net()(IDS), atol=1e-3)
    pm.save_pretrained(str(tmp_path))
    m = make_net()
    report = load_adapter(m, tmp_path)
    assert report.complete and set(report.layers) == set(NET_TARGETS)
    assert all(m.get_submodule(p).lora["default"].variant == "dora" for p in NET_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), y, atol=1e-5, rtol=1e-5)
    save_adapter(m, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_dora"] is True
    with torch.no_grad():
        torch.testing.assert_close(peft_load(make_net(), tmp_path / "again")(IDS), y, atol=1e-5, rtol=1e-5)


def test_lorakit_dora_loads_in_peft_llama(tmp_path: Path) -> None:
    m = tiny_llama()
    torch.manual_seed(1)
    lorakit.inject(
        m, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                              init="random", rank_pattern={"layers.1.v_proj": 2}, use_rslora=True, dora=True)
    )  # fmt: skip
    _move_magnitudes(m)
    y = logits(m)
    save_adapter(m, tmp_path)
    pm = peft_load(tiny_llama(), tmp_path)
    assert not torch.allclose(logits(tiny_llama()), y, atol=1e-3)
    torch.testing.assert_close(logits(pm), y, atol=1e-5, rtol=1e-5)


def test_peft_dora_trained_loads_in_lorakit_llama(tmp_path: Path) -> None:
    """A few real optimiser steps in PEFT (A, B and the magnitudes all move), then lorakit reproduces it."""
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                          use_dora=True, task_type="CAUSAL_LM")  # fmt: skip
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = pm(input_ids=TOKENS_TRAIN, labels=TOKENS_TRAIN).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    y = logits(pm)
    assert not torch.allclose(logits(tiny_llama()), y, atol=1e-3)
    pm.save_pretrained(str(tmp_path))
    m = tiny_llama()
    report = load_adapter(m, tmp_path)
    assert report.complete and len(report.layers) == 8
    torch.testing.assert_close(logits(m), y, atol=1e-5, rtol=1e-5)


TOKENS_TRAIN = torch.arange(16).reshape(2, 8) * 5 % 100


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the DoRA parameters, keyed by ``<layer path>.<A|B|magnitude>`` for both libraries."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for peft_part, ours in (("lora_A.default.weight", "A"), ("lora_B.default.weight", "B"),
                                ("lora_magnitude_vector.default.weight", "magnitude")):  # fmt: skip
            if name.endswith(peft_part):
                out[name.removeprefix("base_model.model.").removesuffix("." + peft_part) + "." + ours] = p.grad
        if ".lora.default." in name:
            path, attr = name.split(".lora.default.")
            out[path + "." + attr] = p.grad
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_step_matches_peft(tmp_path: Path, dropout: float) -> None:
    """Same loss and same gradients for A, B and the magnitude as PEFT, in train mode, with dropout too
    (both draw one dropout mask per adapted layer, in layer order, from torch's global generator).

    Gradients are sums over the batch of O(1) terms: 1e-5 absolute and relative in fp32."""
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                          init_lora_weights=False, lora_dropout=dropout)  # fmt: skip
    pm = peft.get_peft_model(tiny_llama(), cfg)
    _move_magnitudes(pm)
    pm.save_pretrained(str(tmp_path))
    m = tiny_llama()
    load_adapter(m, tmp_path)
    losses = []
    for model in (pm, m):
        model.train()
        torch.manual_seed(11)
        loss = model(input_ids=TOKENS_TRAIN, labels=TOKENS_TRAIN).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    theirs, ours = _grads(pm), _grads(m)
    assert set(ours) == set(theirs) and len(ours) == 18
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-5, msg=k)
