"""LoRA on a quantised frozen base (QLoRA): bitsandbytes' ``Linear4bit`` (NF4, FP4) and ``Linear8bitLt``.

The base weight stays quantised and frozen; the adapter's factors are ordinary
parameters in the layer's compute dtype (a 4-bit layer's ``compute_dtype``; float32 for
8-bit, as PEFT keeps them), and the forward is

    y = base(x) + s * B A dropout(x)         base(x): bitsandbytes' own quantised matmul

so with ``B = 0`` (and inside :func:`lorakit.disabled`) a layer computes exactly what
bitsandbytes computes. The gradient into ``x`` goes through bitsandbytes' backward,
which dequantises one layer's weight at a time (a transient), never every weight at once.

Merging into a 4-bit or 8-bit grid is lossy, so :func:`lorakit.merge` refuses these
layers and :func:`lorakit.merge_and_unload` replaces each by :meth:`merged_module`'s: the
weight dequantised, the adapters added in fp32, stored as a dense ``nn.Linear`` (or
quantised again when asked). :func:`grid_error_bound` is the largest rounding error of
each element of a quantised weight, the scale every lossy path is measured against.

lorakit's registry imports this module by itself the first time it meets one of these
layers (``lorakit.registry.LAZY``), so ``lorakit.inject`` on a model loaded with
transformers' ``BitsAndBytesConfig`` just works. Needs ``pip install "lorakit[qlora]"``.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MixedBatchError, TargetError, require_extra

require_extra("bitsandbytes", "qlora", "lorakit.quant")

# bitsandbytes is only partly typed: its modules are used as Any
bnb: Any = importlib.import_module("bitsandbytes")
bnbF: Any = importlib.import_module("bitsandbytes.functional")

from .layers import LayerHandler, LinearHandler, LoraAdapter, LoraLayer, register  # noqa: E402
from .mixed_kernels import MixedPlan  # noqa: E402

# The dtypes bitsandbytes' 4-bit matmul computes in.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scb(layer: Any) -> torch.Tensor:
    """An 8-bit layer's per-row scale (absmax of each row); bitsandbytes moves it from the
    weight to the layer's matmul state on the first forward."""
    scb = getattr(layer.weight, "SCB", None)
    return cast(torch.Tensor, scb if scb is not None else layer.state.SCB)


def unpack_for_cpu(layer: Any) -> bool:
    """Put a 4-bit weight that bitsandbytes repacked for its CPU kernel back in the usual layout.

    On a CPU with AVX512-BF16, bitsandbytes' first inference forward of a ``Linear4bit``
    (eval mode, input without gradient) repacks the weight in place for its fast kernel
    (``quant_state.packing_format_for_cpu``). That kernel has no backward: a training step
    after an evaluation then got no gradient through the layer (every LoRA factor below the
    last packed layer stopped learning, silently), and the packed bytes are not what
    :func:`dequantized` reads. bitsandbytes undoes the packing itself before saving a state
    dict or moving to a GPU; lorakit does the same before reading the weight, and an adapted
    layer is never packed (``Linear4bitHandler.forward``). The packing stores the block scales
    in bf16 (and undoing it quantises them again under double quantisation), so a layer packed
    before :func:`lorakit.inject` keeps that rounding. Returns whether the layer was packed.
    """
    qs = getattr(layer.weight, "quant_state", None)
    if qs is None or not getattr(qs, "packing_format_for_cpu", False):
        return False
    weight = layer.weight
    weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, qs)
    return True


def quantized_kind(layer: Any) -> str:
    """``"4bit"`` or ``"8bit"``: the kind of quantised weight ``layer`` holds (nothing is dequantised).

    Raises:
        TargetError: ``layer`` is not a quantised bitsandbytes ``Linear4bit``/``Linear8bitLt``
            (e.g. one not moved to its device yet: bitsandbytes quantises on that move).
    """
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit) and getattr(weight, "quant_state", None) is not None:
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt) and weight.dtype == torch.int8:
        return "8bit"
    raise TargetError(f"{type(layer).__name__} holds no quantised weight (its weight is {weight.dtype})")


def dequantized(layer: Any) -> torch.Tensor:
    """The weight ``(out, in)`` a quantised layer computes with, in float32.

    Raises:
        TargetError: ``layer`` is not a quantised bitsandbytes ``Linear4bit``/``Linear8bitLt``.
    """
    if quantized_kind(layer) == "4bit":
        unpack_for_cpu(layer)
        weight = layer.weight
        return cast(torch.Tensor, bnbF.dequantize_4bit(weight.data, weight.quant_state)).float()
    weight = layer.weight
    return cast(torch.Tensor, bnbF.int8_vectorwise_dequant(weight.data, _scb(layer))).float()


def grid_error_bound(layer: Any) -> torch.Tensor:
    """The largest rounding error of each element of a quantised layer's weight, ``(out, in)``.

    4-bit: each block of ``blocksize`` elements is scaled by its absmax ``a`` onto a
    16-value code in [-1, 1]; rounding to the nearest code errs by at most half the
    widest gap between neighbouring codes, times ``a`` (NF4: (1 - 0.7230) / 2 = 0.139 a).
    8-bit: bitsandbytes casts the weight to float16 (half an ulp: 2^-11 relative) and
    rounds ``127 w / a`` to an integer per row: 0.5 a / 127 + 2^-11 a.

    Raises:
        TargetError: not a quantised layer, or a 4-bit layer with double quantisation
            (its stored absmax is itself rounded, so the bound would not hold exactly).
    """
    if quantized_kind(layer) == "4bit":  # raises for anything else
        unpack_for_cpu(layer)
        qs = layer.weight.quant_state
        if qs.nested:
            raise TargetError("grid_error_bound: a double-quantised (nested) 4-bit layer has no exact bound")
        code = qs.code.float().sort().values
        half_gap = float((code[1:] - code[:-1]).max()) / 2
        per_block = cast(torch.Tensor, qs.absmax).float().repeat_interleave(qs.blocksize)[: qs.shape.numel()]
        return (half_gap * per_block).view(qs.shape)
    scb = _scb(layer).float()
    out, n_in = layer.weight.shape
    return (scb * (0.5 / 127 + 2.0**-11)).unsqueeze(1).expand(out, n_in)


class _QuantLinearHandler(LinearHandler):
    """What the 4-bit and 8-bit handlers share: nn.Linear's factor shapes, init and delta,
    a forward on top of bitsandbytes' own, and a merge that replaces the layer."""

    kind = "linear"
    dora_dim = None  # DoRA needs the weight's column norms every step: not on a quantised base
    merges_in_place = False

    def check(self, module: nn.Module, r: int, name: str) -> None:
        try:
            # only the kind: dequantising every weight here cost a float32 copy of each at inject
            quantized_kind(module)
        except TargetError as exc:
            raise TargetError(
                f"{name}: {exc}; move the model to its device (bitsandbytes quantises there) or load it with "
                "lorakit.hf.load_quantized"
            ) from None

    def factor_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32

    def weight_shape(self, module: nn.Module) -> torch.Size:
        # a 4-bit weight is stored packed, two values a byte, as (out * in / 2, 1)
        m = cast(nn.Linear, module)
        return torch.Size((m.out_features, m.in_features))

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        y = cast(torch.Tensor, module._lora_base_cls.forward(module, x))
        live = module._lora_live
        xa = x.to(live[0].A.dtype)  # the adapters compute in their own dtype, whatever x's
        for ad in live:
            h = F.linear(ad.drop(xa), ad.A) * ad.scaling.to(xa.dtype)  # scale the r-wide side
            y = y + F.linear(h, ad.B).to(y.dtype)
        return y

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        raise MixedBatchError(f"mixed batches are not supported on a quantised base ({type(module).__name__})")

    def merged_module(self, layer: LoraLayer, names: tuple[str, ...], requantize: bool) -> nn.Module:
        """``layer``'s weight dequantised with ``names`` added in fp32: a dense ``nn.Linear`` in
        the factors' dtype, or (``requantize``) a new quantised layer of the same kind."""
        weight = dequantized(layer)
        for n in names:
            ad = cast(LoraAdapter, layer.lora[n])
            weight += ad.scaling.float() * self.delta_weight(layer, ad.A.detach().float(), ad.B.detach().float())
        bias = cast("torch.Tensor | None", layer.bias)
        if requantize:
            new = self.quantized_like(layer, weight)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            new.weight = nn.Parameter(weight.to(self.factor_dtype(layer)), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return new

    def quantized_like(self, layer: Any, weight: torch.Tensor) -> nn.Module:
        """A new layer of ``layer``'s kind and settings holding ``weight`` quantised (no bias yet)."""
        raise NotImplementedError


class Linear4bitHandler(_QuantLinearHandler):
    """bitsandbytes ``Linear4bit`` (NF4, FP4; ``LinearNF4``/``LinearFP4`` too): factors in the
    layer's ``compute_dtype``."""

    def factor_dtype(self, module: nn.Module) -> torch.dtype:
        dtype = cast("torch.dtype | None", module.compute_dtype)
        return dtype if dtype is not None else torch.float32

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        # An adapted layer keeps the usual layout: bitsandbytes' packed CPU kernel has no backward,
        # and packing in place at an inference forward would cut the next training step's gradient
        # (unpack_for_cpu). Set on every call: cheap, and it holds for layers adapted before loading.
        module.__dict__["support_avx512bf16_for_cpu"] = False  # a plain attribute of bitsandbytes
        unpack_for_cpu(module)
        return super().forward(module, x)

    def check(self, module: nn.Module, r: int, name: str) -> None:
        super().check(module, r, name)
        if self.factor_dtype(module) not in COMPUTE_DTYPES:
            raise TargetError(
                f"{name}: compute_dtype {module.compute_dtype} is not one bitsandbytes computes in; "
                f"expected one of {[str(d).removeprefix('torch.') for d in COMPUTE_DTYPES]}"
            )

    def quantized_like(self, layer: Any, weight: torch.Tensor) -> nn.Module:
        unpack_for_cpu(layer)  # the settings below are those of the usual layout
        w = layer.weight
        qs = w.quant_state
        new = bnb.nn.Linear4bit(
            weight.shape[1],
            weight.shape[0],
            bias=False,
            compute_dtype=layer.compute_dtype,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=w.quant_storage,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.to(qs.dtype),
            requires_grad=False,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_type=qs.quant_type,
            quant_storage=w.quant_storage,
            module=new,
        )
        return cast(nn.Module, new.to(w.device))  # bitsandbytes quantises on the move to a device


class Linear8bitHandler(_QuantLinearHandler):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8()): factors in float32 (PEFT's default too)."""

    def quantized_like(self, layer: Any, weight: torch.Tensor) -> nn.Module:
        new = bnb.nn.Linear8bitLt(
            weight.shape[1],
            weight.shape[0],
            bias=False,
            has_fp16_weights=False,
            threshold=layer.state.threshold,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return cast(nn.Module, new.to(layer.weight.device))  # quantised on the move to a device


class QuantEmbeddingHandler(LayerHandler):
    """bitsandbytes' quantised embeddings: refused with the fix (without this handler they would
    get nn.Embedding's, which would read the packed bytes as weights)."""

    def check(self, module: nn.Module, r: int, name: str) -> None:
        raise TargetError(
            f"{name}: LoRA on a quantised embedding ({type(module).__name__}) is not supported; keep the "
            "embedding unquantised (transformers' BitsAndBytesConfig does by default) or exclude it"
        )


register(bnb.nn.Linear4bit, Linear4bitHandler())
register(bnb.nn.Linear8bitLt, Linear8bitHandler())
register(bnb.nn.Embedding4bit, QuantEmbeddingHandler())
register(bnb.nn.Embedding8bit, QuantEmbeddingHandler())

__all__ = [
    "COMPUTE_DTYPES",
    "Linear4bitHandler",
    "Linear8bitHandler",
    "QuantEmbeddingHandler",
    "dequantized",
    "grid_error_bound",
    "quantized_kind",
    "unpack_for_cpu",
]
