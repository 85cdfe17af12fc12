"""A tiny Llama saved to disk once, and helpers to load it quantised (bitsandbytes on the CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from lorakit.hf import load_quantized  # noqa: E402

from ..hf.models import VOCAB, llama  # noqa: E402

TOKENS = torch.arange(24).reshape(3, 8) * 7 % VOCAB
# Every layer's input at least bitsandbytes' 64-value block (and outputs a multiple of 32): on a
# CPU with AVX512-BF16, bitsandbytes 0.50's CPU 4-bit quantisation of a 32-wide layer read back
# with errors up to 2.6x its grid bound, and its packed kernel fails on such layers.
WIDTHS = {"hidden": 64, "intermediate": 128}


@pytest.fixture(autouse=True)
def usual_4bit_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain 4-bit layers built in these tests use bitsandbytes' usual CPU kernel.

    On a CPU with AVX512-BF16 a plain ``Linear4bit`` repacks its weight at its first inference
    forward and then computes with a bf16 kernel (and fails for layers narrower than its 64-value
    block, as this tiny Llama's are), while an adapted layer keeps the usual layout
    (``lorakit.quant.unpack_for_cpu``). The exact comparisons here between a plain quantised model
    (or PEFT's) and lorakit's would then compare two kernels, not the adapters. Tests marked
    ``packed_kernel`` keep the CPU's own choice.
    """
    if request.node.get_closest_marker("packed_kernel") is None:
        monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    llama(seed=0, **WIDTHS).save_pretrained(folder)
    return folder


def load(folder: Path, quantize: str, double_quant: bool = False) -> nn.Module:
    """The tiny Llama quantised, computing in float32 (exact comparisons need no bf16 rounding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "inputs will be cast from float32 to float16"
        return load_quantized(folder, quantize, compute_dtype="float32", double_quant=double_quant).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=TOKENS).logits


def quantised_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def base_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantised weight's stored bytes and scales (what training must leave alone)."""
    from lorakit.quant import dequantized

    out = {}
    for n, m in quantised_layers(model).items():
        out[n + ".weight"] = m.weight.data.clone()
        out[n + ".dequantized"] = dequantized(m)  # covers the 4-bit absmax and the 8-bit row scales
    return out
