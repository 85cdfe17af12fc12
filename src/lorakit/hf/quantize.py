"""Load a transformers model with its Linear layers quantised (bitsandbytes), ready for :func:`lorakit.inject`.

    model = lorakit.hf.load_quantized("path/to/model", quantize="nf4", compute_dtype="bfloat16")
    lorakit.inject(model, lorakit.hf.lora_config(model, r=16))      # QLoRA: see lorakit.quant

``quantize``: ``nf4`` or ``fp4`` (4-bit, ``double_quant`` quantises the block scales too,
about 0.4 bit per weight less), or ``int8`` (LLM.int8()). The embeddings, norms and output
head stay unquantised in ``compute_dtype`` (transformers' default). This is what the
command line's ``quantize=`` key calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean, require_extra

QUANTIZE = ("nf4", "fp4", "int8")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype_of(value: str | torch.dtype) -> torch.dtype:
    """``value`` (a name such as ``"bfloat16"`` or a torch dtype) as a dtype bitsandbytes computes in.

    Raises:
        ConfigError: another dtype or name (the message lists the valid ones).
    """
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        got = str(value).removeprefix("torch.")
    elif isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    else:
        got = repr(value)
    raise ConfigError(
        f"compute_dtype must be one of {list(_DTYPES)} (the dtypes bitsandbytes computes in), got {got}"
        + did_you_mean(str(value), _DTYPES)
    )


def quantization_config(quantize: str, compute_dtype: str | torch.dtype = "bfloat16", double_quant: bool = True) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantize`` (``nf4``, ``fp4`` or ``int8``).

    Raises:
        ConfigError: an unknown ``quantize``, a ``compute_dtype`` bitsandbytes does not
            compute in, or a ``double_quant`` that is not a bool.
        MissingExtraError: bitsandbytes is not installed (``pip install "lorakit[qlora]"``).
    """
    if quantize not in QUANTIZE:
        raise ConfigError(
            f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}" + did_you_mean(str(quantize), QUANTIZE)
        )
    dtype = compute_dtype_of(compute_dtype)
    if not isinstance(double_quant, bool):
        raise ConfigError(f"double_quant must be True or False, got {double_quant!r}")
    require_extra("bitsandbytes", "qlora", f"quantize={quantize}")
    from transformers import BitsAndBytesConfig as Config

    BitsAndBytesConfig: Any = Config  # untyped upstream
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def load_quantized(
    path: str | Path,
    quantize: str = "nf4",
    *,
    compute_dtype: str | torch.dtype = "bfloat16",
    double_quant: bool = True,
    device: str | torch.device | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """A transformers model from ``path`` with its Linear layers quantised, frozen and ready for LoRA.

    Args:
        path: a model folder (or a hub name, when online).
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the dtype the 4-bit matmuls, the adapters and the unquantised
            layers compute in (``"float32"``, ``"bfloat16"`` or ``"float16"``).
        double_quant: 4-bit only: quantise the per-block scales too.
        device: where the model goes (default: the first GPU if there is one, else the CPU).
        model_class: the transformers auto class (default ``AutoModelForCausalLM``).
        kwargs: passed on to ``from_pretrained``.

    Raises:
        ConfigError: see :func:`quantization_config`.
        MissingExtraError: bitsandbytes is not installed (``pip install "lorakit[qlora]"``).
    """
    config = quantization_config(quantize, compute_dtype, double_quant)
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    cls = model_class if model_class is not None else AutoModelForCausalLM
    model = cls.from_pretrained(
        str(path), quantization_config=config, dtype=compute_dtype_of(compute_dtype), device_map={"": device}, **kwargs
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return model  # type: ignore[no-any-return]


__all__ = ["QUANTIZE", "compute_dtype_of", "load_quantized", "quantization_config"]
