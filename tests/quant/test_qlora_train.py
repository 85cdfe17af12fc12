"""QLoRA on a tiny Llama loaded 4-bit (NF4, FP4) and 8-bit on the CPU: inject, train, save, reload, PEFT."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.quant import Linear4bitHandler, Linear8bitHandler

from .conftest import TOKENS, WIDTHS, base_bytes, load, logits, quantised_layers

peft = pytest.importorskip("peft")


def train(model: torch.nn.Module, steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            loss = model(input_ids=TOKENS, labels=TOKENS).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    model.eval()
    return losses


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_inject_train_save_reload(quantize: str, llama_dir: Path, tmp_path: Path) -> None:
    model = load(llama_dir, quantize, double_quant=True)
    base = logits(model)
    before = base_bytes(model)
    report = lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear"))
    # every quantised projection got the quantised handler (lazily registered), the head stays out
    assert {t.name for t in report.targets} == set(quantised_layers(model))
    handler = Linear8bitHandler if quantize == "int8" else Linear4bitHandler
    assert all(type(lorakit.handler_for(m)) is handler for m in quantised_layers(model).values())
    assert torch.equal(logits(model), base)  # B = 0: bitsandbytes' own output, bitwise
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the compute dtype

    losses = train(model)
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses  # falls at every step
    after = base_bytes(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stayed quantised and frozen
    trained = logits(model)
    assert not torch.allclose(trained, base)
    with lorakit.disabled(model):
        assert torch.equal(logits(model), base)

    lorakit.save_adapter(model, tmp_path)
    fresh = load(llama_dir, quantize, double_quant=True)
    lorakit.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), trained)  # same factors, same computation


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_peft_loads_the_file_on_the_same_quantised_model(quantize: str, llama_dir: Path, tmp_path: Path) -> None:
    model = load(llama_dir, quantize)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    train(model, steps=3)
    ours = logits(model)
    lorakit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = logits(peft.PeftModel.from_pretrained(load(llama_dir, quantize), str(tmp_path)).eval())
    # The base matmul is the same bitsandbytes call; the LoRA branch differs in where s is
    # applied (lorakit scales the r-wide side), float32 rounding: a few ulps per layer.
    scale = float(ours.abs().max())
    torch.testing.assert_close(theirs, ours, atol=1e-5 * scale, rtol=0)


@pytest.mark.packed_kernel
def test_training_after_an_inference_forward_keeps_every_gradient(tmp_path: Path) -> None:
    """bitsandbytes' CPU kernel choice left as it is. On a CPU with AVX512-BF16 a 4-bit layer
    repacks its weight at its first inference forward, and the packed kernel has no backward: a
    training step after an evaluation got no gradient through those layers (the first layers'
    LoRA factors got exactly zero). Adapted layers stay in the usual layout: after an evaluation
    the gradients equal those of a model never evaluated, bitwise. A layer bitsandbytes packed
    before inject is unpacked (its block scales keep the packing's bf16 rounding, so only
    "every factor gets a gradient" is compared there). On a CPU without AVX512-BF16 nothing
    packs, and the test only shows that evaluating changes nothing."""
    from ..hf.models import llama

    folder = tmp_path / "llama64"
    llama(seed=0, **WIDTHS).save_pretrained(folder)

    def grads(evaluate: str) -> dict[str, torch.Tensor]:
        model = load(folder, "nf4")
        if evaluate == "before inject":
            logits(model)  # plain layers: bitsandbytes may pack them here
        torch.manual_seed(0)
        lorakit.inject(model, lorakit.LoraConfig(r=4, targets="all-linear"))
        with torch.no_grad():  # B random, so every factor gets a gradient
            for n, p in model.named_parameters():
                if n.endswith(".B"):
                    p.copy_(torch.randn(p.shape) * 0.1)
        if evaluate == "after inject":
            logits(model)  # adapted layers: must not pack
        model.train()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        qs = {n: m.weight.quant_state for n, m in quantised_layers(model).items()}
        packed = [n for n, q in qs.items() if getattr(q, "packing_format_for_cpu", False)]
        assert packed == [], packed
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after, before = grads("never"), grads("after inject"), grads("before inject")
    assert fresh.keys() == after.keys() == before.keys() and len(fresh) == 2 * 7 * 2  # A, B; 7 projections; 2 layers
    for n, g in fresh.items():
        assert torch.equal(g, after[n]), n
        assert float(before[n].abs().sum()) > 0, n
