"""Bad input around a quantised base: typed errors naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MixedBatchError, TargetError
from lorakit.hf import load_quantized, quantization_config

from .conftest import TOKENS, load

bnb = pytest.importorskip("bitsandbytes")


def _blocked(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where importing bitsandbytes fails (as if not installed)."""
    prelude = "import sys\nsys.modules['bitsandbytes'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "call", ["import lorakit.quant", "import lorakit.hf; lorakit.hf.load_quantized('no-such-model', 'nf4')"]
)
def test_without_bitsandbytes_the_error_names_the_extra(call: str) -> None:
    code = f"try:\n    {call}\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    done = _blocked(code)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    assert out.startswith("MissingExtraError") and 'pip install "lorakit[qlora]"' in out, out


def test_the_registry_finds_the_handlers_lazily() -> None:
    code = (
        "import sys, bitsandbytes as bnb, lorakit\n"
        "assert 'lorakit.quant' not in sys.modules\n"
        "for t in (bnb.nn.Linear4bit, bnb.nn.LinearNF4, bnb.nn.Linear8bitLt):\n"
        "    print(type(lorakit.handler_for(t)).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["Linear4bitHandler", "Linear4bitHandler", "Linear8bitHandler"], done.stderr


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantize": "nf5"}, r"quantize must be one of \['nf4', 'fp4', 'int8'\], got 'nf5'; did you mean 'nf4'"),
        ({"quantize": "nf4", "compute_dtype": "float64"}, r"compute_dtype must be one of .* got 'float64'"),
        ({"quantize": "nf4", "compute_dtype": torch.int8}, r"compute_dtype must be one of .* got int8"),
        ({"quantize": "nf4", "double_quant": "yes"}, r"double_quant must be True or False, got 'yes'"),
    ],
)
def test_bad_quantize_options(kwargs: dict[str, object], match: str, llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        quantization_config(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        load_quantized(llama_dir, **kwargs)  # type: ignore[arg-type]


class _Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def test_layers_bitsandbytes_cannot_take_lora() -> None:
    emb = bnb.nn.Embedding4bit(10, 64)
    with pytest.raises(TargetError, match=r"layer: LoRA on a quantised embedding \(Embedding4bit\) is not supported"):
        lorakit.inject(_Net(emb), lorakit.LoraConfig(r=2, targets=["layer"]))
    unquantised = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # bitsandbytes quantises on .to(device) only
    with pytest.raises(TargetError, match=r"layer: Linear4bit holds no quantised weight .* move the model to its"):
        lorakit.inject(_Net(unquantised), lorakit.LoraConfig(r=2, targets=["layer"]))
    odd = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float64).to("cpu")
    with pytest.raises(TargetError, match=r"compute_dtype torch.float64 is not one bitsandbytes computes in"):
        lorakit.inject(_Net(odd), lorakit.LoraConfig(r=2, targets=["layer"]))
    assert type(odd) is bnb.nn.Linear4bit  # nothing changed


def test_what_a_quantised_base_does_not_support(llama_dir: Path) -> None:
    model = load(llama_dir, "nf4")
    with pytest.raises(TargetError, match="DoRA"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"], dora=True))
    with pytest.raises(TargetError, match="PiSSA/OLoRA init needs a plain Linear"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"], init="pissa"))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["q_proj"]), name="other")
    with (
        pytest.raises(MixedBatchError, match="quantised base"),
        lorakit.mixed_batch(model, ["default", "other", "default"]),
    ):
        model(input_ids=TOKENS)
