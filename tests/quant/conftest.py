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


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    llama(seed=0).save_pretrained(folder)
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
