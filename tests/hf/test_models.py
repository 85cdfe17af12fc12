"""One battery over tiny GPT-2, Llama, BERT and ViT: default targets, train, save, reload, merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
import lorakit.hf
from lorakit.hf.conv1d import Conv1D

from .models import BUILDERS, batch, outputs

KINDS = sorted(BUILDERS)


def train(model: nn.Module, b: dict[str, torch.Tensor], steps: int = 12) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_train_save_reload_merge(kind: str, tmp_path: Path) -> None:
    model = BUILDERS[kind]()
    b = batch(kind)
    base_out = outputs(model, b)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lorakit.hf.lora_config(model, r=4, alpha=8)
    report = lorakit.inject(model, cfg)
    assert report.targets and all(t.layer_type in ("Linear", "Conv1D") for t in report.targets)
    torch.testing.assert_close(outputs(model, b), base_out, rtol=0, atol=0)  # B = 0: exactly the base

    losses = train(model, b)
    assert losses[-1] < 0.95 * losses[0], losses
    adapted = outputs(model, b)
    assert not torch.allclose(adapted, base_out, atol=1e-4)
    for k, v in model.state_dict().items():  # only adapters (and a fully trained head) moved
        if k in base_state and not any(k.startswith(h) for h in cfg.train_modules):
            assert torch.equal(v, base_state[k]), k

    lorakit.save_adapter(model, tmp_path / "a")
    fresh = BUILDERS[kind]()
    lorakit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(outputs(fresh, b), adapted, rtol=0, atol=0)

    lorakit.merge(fresh)
    torch.testing.assert_close(outputs(fresh, b), adapted, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(fresh)
    assert all(
        torch.equal(v, base_state[k])
        for k, v in fresh.state_dict().items()
        if k in base_state and not any(k.startswith(h) for h in cfg.train_modules)
    )
    plain = lorakit.merge_and_unload(fresh)
    assert not list(lorakit.lora_layers(plain))
    torch.testing.assert_close(outputs(plain, b), adapted, rtol=1e-5, atol=1e-5)


def test_default_targets_per_family() -> None:
    gpt2, llama, bert, vit = (BUILDERS[k]() for k in ("gpt2", "llama", "bert", "vit"))
    assert lorakit.hf.default_targets(gpt2) == ["c_attn", "c_proj", "c_fc"]
    assert lorakit.hf.default_targets(llama) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    for model, n_per_layer in ((gpt2, 4), (llama, 7), (bert, 6), (vit, 6)):
        found = [n for n, _, _ in lorakit.select_targets(model, lorakit.hf.lora_config(model))]
        assert len(found) == 2 * n_per_layer, found
        assert not any("pooler" in n or "classifier" in n or "lm_head" in n for n in found), found


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_never_touches_the_head(kind: str) -> None:
    model = BUILDERS[kind]()
    heads = lorakit.hf.output_heads(model)
    assert heads and heads[0] in ("lm_head", "classifier")
    found = [n for n, _, _ in lorakit.select_targets(model, lorakit.hf.lora_config(model, "all-linear"))]
    assert found and not any(n.split(".")[0] in heads for n in found), found
    if kind in ("gpt2", "llama"):  # core "all-linear" alone already skips get_output_embeddings()
        core = [n for n, _, _ in lorakit.select_targets(model, lorakit.LoraConfig(targets="all-linear"))]
        assert "lm_head" not in core and sorted(core) == sorted(found)


def test_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(lorakit.TargetError, match="no default LoRA targets.*all-linear"):
        lorakit.hf.default_targets(nn.Linear(2, 2))


def test_conv1d_handler_is_registered_lazily() -> None:
    # The registry maps Conv1D to lorakit.hf (registry.LAZY); a fresh interpreter that never
    # imports lorakit.hf still adapts GPT-2.
    import subprocess
    import sys

    code = (
        "import sys, torch, transformers, lorakit\n"
        "assert 'lorakit.hf' not in sys.modules\n"
        "m = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))\n"
        "r = lorakit.inject(m, lorakit.LoraConfig(r=2, targets='all-linear'))\n"
        "assert 'lorakit.hf' in sys.modules and len(r.targets) == 4, r\n"
        "print(type(m.h[0].attn.c_attn).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LoraConv1D"


def test_conv1d_shapes_delta_and_grads() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(Conv1D(6, 5))  # nf=6 out, nx=5 in: weight (5, 6)
    lorakit.inject(layer, lorakit.LoraConfig(r=3, alpha=6, targets=["0"], init="random"), "a")
    conv = layer[0]
    ad = conv.lora["a"]
    assert ad.A.shape == (3, 5) and ad.B.shape == (6, 3)
    x = torch.randn(2, 4, 5, requires_grad=True)
    expect = x @ conv.weight + conv.bias + 2.0 * (x @ ad.A.t()) @ ad.B.t()
    y = layer(x)  # fused single-adapter path
    torch.testing.assert_close(y, expect)
    delta = conv.lora_delta(("a",))
    assert delta.shape == conv.weight.shape
    torch.testing.assert_close(delta, 2.0 * (ad.B @ ad.A).t())
    # Fused path and the plain autograd path give the same gradients.
    g = torch.randn_like(y)
    grads_fused = torch.autograd.grad(y, (x, ad.A, ad.B), g)
    grads_plain = torch.autograd.grad(expect, (x, ad.A, ad.B), g)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b)
    # Two active adapters (the unfused path) add up.
    lorakit.inject(layer, lorakit.LoraConfig(r=2, targets=["0"], init="random"), "b")
    lorakit.set_adapter(layer, ["a", "b"])
    bd = conv.lora["b"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expect + (x @ bd.A.t()) @ bd.B.t())
