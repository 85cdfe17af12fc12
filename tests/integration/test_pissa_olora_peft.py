"""PEFT as the oracle for PiSSA/OLoRA: the same init on a tiny Llama gives the same residual base and
the same adapter product, and the converted (rank-2r, original-base) adapters load both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit

from .test_peft_interop import TOKENS, logits, peft_load, tiny_llama

peft = pytest.importorskip("peft")
torch.set_num_threads(1)

TARGETS = ["q_proj", "v_proj", "gate_proj"]
# fp32 on 32..64-wide layers: the SVD/QR and W - s B A agree to a few ulps of |W| (~0.02 here, default
# init std 0.02), and the logits (|y| ~ 0.1..1 after 2 layers) to ~1e-6; 1e-5 is 10x above that.
ATOL = 1e-5


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    opt = torch.optim.SGD(params, lr=1.0)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        out = model(input_ids=TOKENS).logits
        torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), TOKENS.reshape(-1)).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_init_as_peft(init: str) -> None:
    base_logits = logits(tiny_llama())
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    pm = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    ).eval()
    layers = [p for p, _ in lorakit.lora_layers(m)]
    assert len(layers) == 6
    for p in layers:
        ours = m.get_submodule(p)
        theirs = pm.base_model.model.get_submodule(p)
        ad = ours.lora["default"]
        torch.testing.assert_close(ours.weight, theirs.base_layer.weight, atol=ATOL, rtol=0)
        # compare products: singular vectors are defined up to a joint sign per pair
        ba = theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight
        torch.testing.assert_close(ad.B @ ad.A, ba, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(m), base_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(pm), base_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_lorakit_converted_adapter_loads_in_peft_on_the_original_base(tmp_path: Path, init: str) -> None:
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, init=init, use_rslora=init == "olora"))
    _train(m, [p for p in m.parameters() if p.requires_grad])
    trained = logits(m)
    assert not torch.allclose(trained, logits(tiny_llama()), atol=1e-3)
    lorakit.save_adapter(m, tmp_path, original_base=True)
    torch.testing.assert_close(logits(peft_load(tiny_llama(), tmp_path)), trained, atol=ATOL, rtol=0)
    fresh = tiny_llama()
    assert lorakit.load_adapter(fresh, tmp_path).complete
    torch.testing.assert_close(logits(fresh), trained, atol=ATOL, rtol=0)


def test_peft_converted_adapter_loads_in_lorakit(tmp_path: Path) -> None:
    pm = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    )
    pm.save_pretrained(str(tmp_path / "init"))  # PEFT's conversion reads the factors at init from here
    _train(pm, [p for p in pm.parameters() if p.requires_grad])
    trained = logits(pm)
    assert not torch.allclose(trained, logits(tiny_llama()), atol=1e-3)
    pm.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    m = tiny_llama()
    report = lorakit.load_adapter(m, tmp_path / "lora")
    assert report.complete and m.model.layers[0].self_attn.q_proj.lora["default"].r == 8
    torch.testing.assert_close(logits(m), trained, atol=ATOL, rtol=0)


def test_plain_pissa_save_reruns_the_init_in_peft(tmp_path: Path) -> None:
    """Saved plainly, the file says init_lora_weights='pissa': PEFT re-runs the init on the original
    base (the residual is determined by W) and then loads the trained factors, as for its own files."""
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, init="pissa"))
    _train(m, [p for p in m.parameters() if p.requires_grad])
    trained = logits(m)
    lorakit.save_adapter(m, tmp_path)
    pm = peft_load(tiny_llama(), tmp_path)  # (PEFT warns that PiSSA changes the base weights)
    torch.testing.assert_close(logits(pm), trained, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_has_no_conv_init_either(init: str) -> None:
    """lorakit refuses PiSSA/OLoRA on convolutions (tests/unit/test_pissa_olora.py); PEFT does too."""
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match="Unknown initialization"):
        peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=init))
    with pytest.raises(lorakit.TargetError, match="PEFT defines these inits for Linear layers only"):
        lorakit.inject(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3)), lorakit.LoraConfig(r=4, targets=["0"], init=init))
