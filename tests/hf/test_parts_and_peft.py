"""Conv1D and partial fused projections (q, v of GPT-2's c_attn): PEFT interop, exact merging,
untouched parts stay untouched."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
import lorakit.hf
from lorakit.hf.parts import PartsConv1D, PartsLinear

from .models import VOCAB, batch, gpt2, outputs

peft = pytest.importorskip("peft")


def peft_logits(folder: Path, ids: torch.Tensor, base: nn.Module) -> torch.Tensor:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message) or "Unexpected" in str(w.message)]
    assert not bad, bad
    with torch.no_grad():
        return pm(input_ids=ids).logits


def randomize(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for ad in layer.lora.values():
                ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.3)


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path: Path) -> None:
    model = gpt2()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=12, targets=["c_attn", "c_proj", "c_fc"]))
    randomize(model)
    ids = batch("gpt2")["input_ids"]
    ours = outputs(model, {"input_ids": ids})
    assert not torch.allclose(ours, outputs(gpt2(), {"input_ids": ids}), atol=1e-3)
    lorakit.save_adapter(model, tmp_path)
    torch.testing.assert_close(peft_logits(tmp_path, ids, gpt2()), ours, rtol=1e-5, atol=1e-5)
    # ... and PEFT's own GPT-2 file loads in lorakit.
    pm = peft.get_peft_model(
        gpt2(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    )
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = pm.eval()(input_ids=ids).logits
    fresh = gpt2()
    lorakit.load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(outputs(fresh, {"input_ids": ids}), theirs, rtol=1e-5, atol=1e-5)


def test_mixed_batch_on_conv1d_equals_each_adapter_alone() -> None:
    model = gpt2()
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + seed, targets="all-linear"), name)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                if name in layer.lora:
                    layer.lora[name].B.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    ids = batch("gpt2")["input_ids"]
    names = ["a", None, "b", "a"]
    with lorakit.mixed_batch(model, names):
        mixed = outputs(model, {"input_ids": ids})
    for i, n in enumerate(names):
        if n is None:
            with lorakit.disabled(model):
                alone = outputs(model, {"input_ids": ids[i : i + 1]})
        else:
            lorakit.set_adapter(model, n)
            alone = outputs(model, {"input_ids": ids[i : i + 1]})
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def _train_parts(model: nn.Module, steps: int = 5) -> None:
    b = batch("gpt2")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_parts_adapt_only_q_and_v_and_merge_exactly(tmp_path: Path) -> None:
    model = gpt2()
    paths = lorakit.hf.target_fused(model, "c_attn", parts=("q", "v"))
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, PartsConv1D) and isinstance(attn, lorakit.hf.conv1d.Conv1D)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["c_attn"]))
    _train_parts(model)
    d = 32
    for _, layer in lorakit.lora_layers(model):
        B = layer.lora["default"].B.detach()
        assert B.shape == (3 * d, 4)
        assert torch.equal(B[d : 2 * d], torch.zeros(d, 4)), "k rows must stay exactly zero"
        assert torch.equal(B[:d, 2:], torch.zeros(d, 2)) and torch.equal(B[2 * d :, :2], torch.zeros(d, 2))
        assert B[:d, :2].abs().sum() > 0 and B[2 * d :, 2:].abs().sum() > 0
        delta = layer.lora_delta(("default",))  # (in, out): the k columns never change
        assert torch.equal(delta[:, d : 2 * d], torch.zeros(d, d))
    # The k slice of c_attn's output is the base's, bitwise.
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        full = attn(x)
        with lorakit.disabled(model):
            base = attn(x)
    assert torch.equal(full[..., d : 2 * d], base[..., d : 2 * d])
    assert not torch.allclose(full[..., :d], base[..., :d])

    ids = batch("gpt2")["input_ids"]
    adapted = outputs(model, {"input_ids": ids})
    lorakit.merge(model)
    torch.testing.assert_close(outputs(model, {"input_ids": ids}), adapted, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)

    # Files: an ordinary rank-4 PEFT file. PEFT, a plain lorakit model and a parts model agree.
    lorakit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    torch.testing.assert_close(peft_logits(tmp_path, ids, gpt2()), adapted, rtol=1e-5, atol=1e-5)
    plain = gpt2()
    lorakit.load_adapter(plain, tmp_path)
    torch.testing.assert_close(outputs(plain, {"input_ids": ids}), adapted, rtol=0, atol=0)
    parts = gpt2()
    lorakit.hf.target_fused(parts, "c_attn", parts=("q", "v"))
    lorakit.load_adapter(parts, tmp_path)
    torch.testing.assert_close(outputs(parts, {"input_ids": ids}), adapted, rtol=0, atol=0)
    lorakit.merge_and_unload(parts)
    assert lorakit.hf.restore_fused(parts) == paths
    assert type(parts.transformer.h[0].attn.c_attn) is lorakit.hf.conv1d.Conv1D


def test_parts_on_linear_with_unequal_split() -> None:
    # A grouped-query attention layout (q 32, k 16, v 16) fused into one Linear.
    lin = nn.Sequential(nn.Linear(32, 64))
    lorakit.hf.target_fused(lin, "0", parts=("v",), split={"q": 32, "k": 16, "v": 16})
    assert isinstance(lin[0], PartsLinear)
    lorakit.inject(lin, lorakit.LoraConfig(r=2, targets=["0"], init="gaussian"))
    x = torch.randn(3, 32)
    base = lin[0].weight.detach().clone()
    opt = torch.optim.Adam([p for p in lin.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = lin(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    B = lin[0].lora["default"].B.detach()
    assert torch.equal(B[:48], torch.zeros(48, 2)) and B[48:].abs().sum() > 0
    lorakit.merge(lin)
    assert torch.equal(lin[0].weight[:48], base[:48])


def test_parts_errors() -> None:
    model = gpt2()
    with pytest.raises(lorakit.TargetError, match="no module matched"):
        lorakit.hf.target_fused(model, "c_qkv")
    with pytest.raises(lorakit.TargetError, match="not in split"):
        lorakit.hf.target_fused(model, "c_attn", parts=("q", "x"))
    with pytest.raises(lorakit.TargetError, match="Conv1D or nn.Linear"):
        lorakit.hf.target_fused(model, "wte")
    lorakit.hf.target_fused(model, "c_attn", parts=("q", "v"))
    with pytest.raises(lorakit.TargetError, match="multiple of 2"):
        lorakit.inject(model, lorakit.LoraConfig(r=3, targets=["c_attn"]))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["c_attn"]))
    with pytest.raises(lorakit.TargetError, match="already has adapters"):
        lorakit.hf.target_fused(model, "c_attn")
    with pytest.raises(lorakit.TargetError, match="still has adapters"):
        lorakit.hf.restore_fused(model)
    assert VOCAB == 100
