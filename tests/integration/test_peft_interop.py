"""PEFT interop both ways: lorakit files load in peft.PeftModel, PEFT files load in lorakit, same outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.io import load_adapter, save_adapter
from lorakit.io_errors import AdapterFileError

from ..unit.io_models import IDS, adapted_net, make_net

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return transformers.LlamaForCausalLM(cfg).eval()


TOKENS = torch.arange(12).reshape(2, 6) * 7 % 100


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def peft_load(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    problems = [str(w.message) for w in caught if "Unexpected keyword" in str(w.message) or "missing" in str(w.message)]
    assert not problems, problems
    return model


def test_lorakit_to_peft_custom_layers(tmp_path: Path) -> None:
    m = adapted_net(rank_pattern={"lin": 2}, alpha_pattern={"emb": 5.0}, train_modules=["head"])
    with torch.no_grad():
        m.head.weight.add_(0.5)
    save_adapter(m, tmp_path)
    pm = peft_load(make_net(), tmp_path)
    with torch.no_grad():
        assert not torch.allclose(make_net()(IDS), m(IDS), atol=1e-3)
        torch.testing.assert_close(pm(IDS), m(IDS), atol=1e-5, rtol=1e-5)


def test_peft_to_lorakit_custom_layers(tmp_path: Path) -> None:
    torch.manual_seed(3)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["emb", "conv", "lin"], init_lora_weights=False,
        rank_pattern={"conv": 2}, modules_to_save=["head"],
    )  # fmt: skip
    pm = peft.get_peft_model(make_net(), cfg).eval()
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
        y = pm(IDS)
    pm.save_pretrained(str(tmp_path))
    m = make_net()
    report = load_adapter(m, tmp_path)
    assert report.complete and not report.base_checked and set(report.layers) == {"emb", "conv", "lin"}
    assert m.conv.lora["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), y, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd")
def test_peft_grouped_conv_dense_A(tmp_path: Path) -> None:
    """PEFT's grouped-conv A is dense: loads when off-block entries are zero, refused otherwise."""
    torch.manual_seed(4)
    pm = peft.get_peft_model(
        make_net(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["gconv"], init_lora_weights=False)
    )
    pm.eval()
    pm.save_pretrained(str(tmp_path / "dense"))
    m = make_net()
    with pytest.raises(AdapterFileError, match="across groups") as err:
        load_adapter(m, tmp_path / "dense")
    assert "adapter_model.safetensors" in str(err.value) and lorakit.list_adapters(m) == []
    A = pm.base_model.model.gconv.lora_A["default"].weight
    with torch.no_grad():
        A[:2, 4:] = 0  # rank rows 0-1 belong to group 0 (input channels 0-3)
        A[2:, :4] = 0
        y = pm(IDS)
    pm.save_pretrained(str(tmp_path / "block"))
    load_adapter(m, tmp_path / "block")
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), y, atol=1e-5, rtol=1e-5)


def test_lorakit_to_peft_llama(tmp_path: Path) -> None:
    m = tiny_llama()
    torch.manual_seed(1)
    lorakit.inject(
        m, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init="random",
                              rank_pattern={"layers.1.v_proj": 2}, use_rslora=True)
    )  # fmt: skip
    y = logits(m)
    save_adapter(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 6 and "model.layers.0.self_attn.q_proj" in cfg["target_modules"]
    pm = peft_load(tiny_llama(), tmp_path)
    assert not torch.allclose(logits(tiny_llama()), y, atol=1e-3)
    torch.testing.assert_close(logits(pm), y, atol=1e-5, rtol=1e-5)


def test_peft_to_lorakit_llama(tmp_path: Path) -> None:
    torch.manual_seed(2)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], init_lora_weights=False,
        alpha_pattern={"o_proj": 3}, use_rslora=True, task_type="CAUSAL_LM",
    )  # fmt: skip
    pm = peft.get_peft_model(tiny_llama(), cfg).eval()
    y = logits(pm)
    pm.save_pretrained(str(tmp_path))
    m = tiny_llama()
    report = load_adapter(m, tmp_path)
    assert report.complete and len(report.layers) == 8
    torch.testing.assert_close(logits(m), y, atol=1e-5, rtol=1e-5)
    # and back: lorakit re-saves what it loaded, PEFT reads it
    save_adapter(m, tmp_path / "again")
    torch.testing.assert_close(logits(peft_load(tiny_llama(), tmp_path / "again")), y, atol=1e-5, rtol=1e-5)
