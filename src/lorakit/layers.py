"""The built-in LoRA layer types: handlers for Linear, Conv1d/2d/3d and Embedding.

What every layer type shares (the adapted layer :class:`LoraLayer`, its adapters, wrap
and unwrap, the handler protocol and registry) is in :mod:`lorakit.layer_base`; the
names are re-exported here, where they were first defined.

Convolutions (groups ``G``): ``A`` is a conv with the base kernel size,
stride, padding, dilation, padding mode and groups, mapping ``in -> r``;
``B`` is a grouped 1x1 conv ``r -> out``. Group ``g`` of the output then
depends only on group ``g`` of the input, exactly like the base conv, so the
composition is one conv with kernel ``delta W = B_g A_g`` per group and every
adapted conv, grouped and depthwise included, merges exactly. This needs
``r % G == 0`` (rank ``r / G`` per group).
"""

from __future__ import annotations

__all__ = [
    "CONV_FORM_ATTR",
    "ConvHandler",
    "EmbeddingHandler",
    "LayerHandler",
    "LinearHandler",
    "LoraAdapter",
    "LoraLayer",
    "adapter_dict",
    "handler_for",
    "live_rank",
    "lora_class_for",
    "register",
    "unwrap",
    "wrap",
]

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TargetError
from .fused import LoraLinearFn, new_seed
from .layer_base import (  # re-exported: layers.py was their first home
    CONV_FORM_ATTR,
    LayerHandler,
    LoraAdapter,
    LoraLayer,
    adapter_dict,
    handler_for,
    live_rank,
    lora_class_for,
    register,
    unwrap,
    wrap,
)
from .layer_base import _restore as _restore  # pickles made before the move name lorakit.layers._restore
from .mixed_kernels import MixedPlan, conv_mixed, embedding_mixed, linear_mixed

# --------------------------------------------------------------------------------------
# Built-in handlers
# --------------------------------------------------------------------------------------


def _kaiming(t: torch.Tensor) -> None:
    # nn.Linear's own default: uniform(+-1/sqrt(fan_in)).
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def _linear_inference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, ad: LoraAdapter) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` without autograd, in whichever form costs less.

    For N tokens, W ``(out, in)``, rank r: the activation form adds two r-wide
    products, ``N r (in + out)`` multiply-adds (skinny GEMMs, well below peak on a
    CPU); the weight form builds ``W + s B A`` (``r in out``) and runs one GEMM.
    The weight form does fewer multiply-adds once ``N (in + out) > in out`` (N > 256 for a
    512 x 512 layer), but building ``W + s B A`` is itself a K=r GEMM plus an
    ``out x in`` write, and the measured break-even (1 thread, r=16, this repository's
    CPU) is about twice that:
    at 256 tokens on 512 x 512 the activation form was 1.23x the bare layer and the
    weight form 1.31x; at 1024 tokens 1.06-1.13x against 1.04-1.06x; at 64 tokens or
    fewer the weight form was 1.7-5.8x. So the weight form is taken from
    ``N (in + out) > 2 in out`` on: prefill, batch scoring, training-shape
    evaluation; decoding a few tokens stays in the activation form. Both give the
    merged model's result (to rounding), and with B = 0 both are bitwise the base.
    """
    n_out, n_in = W.shape
    s = ad.scaling.to(x.dtype)
    if (x.numel() // n_in) * (n_in + n_out) > 2 * n_in * n_out:
        return F.linear(x, torch.addmm(W, ad.B * s, ad.A), b)
    y = F.linear(x, W, b)
    h = F.linear(x, ad.A).mul_(s)
    if not y.is_contiguous():  # pragma: no cover - F.linear returns contiguous outputs
        return y + F.linear(h, ad.B)
    y.view(-1, n_out).addmm_(h.view(-1, h.shape[-1]), ad.B.t())  # in place: no out-wide temporary
    return y


class LinearHandler(LayerHandler):
    """``nn.Linear``: A ``(r, in)``, B ``(out, r)``, delta W = B A ``(out, in)``."""

    kind = "linear"

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = cast(nn.Linear, module)
        return (r, m.in_features), (m.out_features, r)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            else:
                _kaiming(A)
            if init == "random":
                _kaiming(B)
            else:
                B.zero_()

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Linear, module)
        live = module._lora_live
        # meta tensors (shape inference on an unmaterialised model) take the plain path:
        # autocast has no state for the meta device
        if len(live) == 1 and x.device.type != "meta" and not torch.is_autocast_enabled(x.device.type):
            ad = live[0]
            p = ad.dropout if ad.training else 0.0
            if p == 0.0 and not torch.is_grad_enabled():
                return _linear_inference(x, m.weight, m.bias, ad)
            # Training: one adapter fused into one autograd node (see lorakit.fused).
            seed = new_seed() if p > 0 else 0
            return cast(torch.Tensor, LoraLinearFn.apply(x, m.weight, m.bias, ad.A, ad.B, ad.scaling, p, seed))
        y = F.linear(x, m.weight, m.bias)
        for ad in live:
            # Scale the r-wide intermediate, not the out-wide result: r << out.
            h = F.linear(ad.drop(x), ad.A) * ad.scaling.to(x.dtype)
            y = y + F.linear(h, ad.B)
        return y

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        m = cast(nn.Linear, module)
        return linear_mixed(x, F.linear(x, m.weight, m.bias), plan)

    dora_dim: int | None = 0  # DoRA: one magnitude per output row, the norm over the inputs

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, ad.A) * s, ad.B)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvHandler(LinearHandler):
    """``nn.Conv1d/2d/3d``, every stride, padding (``'same'`` too), dilation,
    padding mode and group count.

    Shapes (``G`` groups, kernel ``k``): A ``(r, in/G, *k)``, B ``(out, r/G, 1, ...)``.
    delta W per group g: ``B_g (out/G x r/G) @ A_g (r/G x in/G*prod(k))``, giving
    ``(out, in/G, *k)``, the base weight's shape. Requires ``r % G == 0``.

    Two equivalent forward forms, chosen per layer (``mode``):

    * activation form: ``y = conv(x, W) + B(conv(x, A))``. Per output pixel it adds
      about ``3 (r in/G K + out r/G)`` multiply-adds over forward and backward
      (K = prod(k)), and is needed for dropout (which acts on A's input).
    * weight form: ``y = conv(x, W + s delta W)``: one conv; the backward then needs
      the weight gradient of the whole conv, ``out in/G K`` per output pixel, from
      which dA and dB follow cheaply.

    ``mode="auto"`` (default), when no dropout is active, takes the form measured for
    the layer by :func:`lorakit.conv_forms.measure_conv_forms` if there is one, else
    the weight form unless the activation form's count, weighted by
    :attr:`thin_cost`, is the smaller. Set
    ``lorakit.handler_for(nn.Conv2d).mode`` to ``"activation"`` or ``"weight"`` to
    force one.
    """

    kind = "conv"
    mode = "auto"
    # What one multiply-add of the activation form's thin convolutions (r channels) costs next to one of the
    # whole weight gradient: thin convs run far from GEMM speed. Measured on a 2-core x86 CPU, one thread
    # (bench/conv_forms.py, yolo26n r=8, every adapted conv at its real shape): with 4 the rule came within
    # 0.3 % (imgsz 160, batch 16) and 0.9 % (imgsz 640, batch 8) of the per-layer faster form; with 1 (plain
    # counts) 16 % and 15 % above it, and slower than full fine-tuning's convs.
    thin_cost = 4.0

    def use_weight_form(self, module: LoraLayer) -> bool:
        """The ``mode`` rule above, for the live adapters of ``module``; in ``"auto"`` a form
        measured for this layer and rank (:func:`lorakit.conv_forms.measure_conv_forms`) wins."""
        if self.mode != "auto":
            return self.mode == "weight"
        r = live_rank(module)
        measured = module.__dict__.get(CONV_FORM_ATTR)
        if measured is not None and measured[1] == r:
            return bool(measured[0] == "weight")
        m = cast(nn.Conv2d, module)
        per_group_in = m.in_channels // m.groups
        k = math.prod(m.kernel_size)
        thin = 3 * (r * per_group_in * k + m.out_channels * r // m.groups)
        return m.out_channels * per_group_in * k < self.thin_cost * thin

    def check(self, module: nn.Module, r: int, name: str) -> None:
        m = cast(nn.Conv2d, module)
        if r % m.groups:
            raise TargetError(
                f"{name}: {type(m).__name__}({m.in_channels}, {m.out_channels}, groups={m.groups}) needs "
                f"r to be a multiple of groups={m.groups}, got r={r}; give it a multiple of {m.groups} "
                f"with rank_pattern, or exclude it"
            )

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = cast(nn.Conv2d, module)
        k = tuple(m.kernel_size)
        return (r, m.in_channels // m.groups, *k), (m.out_channels, r // m.groups, *([1] * len(k)))

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Conv2d, module)
        live = module._lora_live
        dropping = any(ad.dropout > 0 and ad.training for ad in live)
        if not dropping and self.use_weight_form(module):
            w = m.weight
            for ad in live:
                w = w + self.delta_weight(m, ad.A, ad.B) * ad.scaling.to(w.dtype)
            return cast(torch.Tensor, m._conv_forward(x, w, m.bias))
        y: torch.Tensor = m._conv_forward(x, m.weight, m.bias)
        conv = _CONV_FN[len(m.kernel_size)]
        for ad in live:
            # A reuses the base conv's own padding/stride/dilation/groups path.
            h = m._conv_forward(ad.drop(x), ad.A, None) * ad.scaling.to(x.dtype)
            y = y + conv(h, ad.B, groups=m.groups)
        return y

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Conv2d, module)
        g = m.groups
        r = A.shape[0]
        # (out, r/G, 1..) -> (G, out/G, r/G);  (r, in/G, *k) -> (G, r/G, in/G * prod(k))
        b = B.reshape(g, m.out_channels // g, r // g)
        a = A.reshape(g, r // g, -1)
        return torch.bmm(b, a).reshape(m.weight.shape)

    def pad_rank(
        self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, A_out: torch.Tensor, B_out: torch.Tensor
    ) -> None:
        # Rank rows are grouped (r/G per group), so pad inside each group.
        g = cast(nn.Conv2d, module).groups
        r, r_out = A.shape[0], A_out.shape[0]
        A_out.view(g, r_out // g, *A.shape[1:])[:, : r // g] = A.reshape(g, r // g, *A.shape[1:])
        B_out[:, : r // g] = B

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        m = cast(nn.Conv2d, module)
        return conv_mixed(m, x, m._conv_forward(x, m.weight, m.bias), plan)

    # DoRA (lorakit.variants): the magnitude has PEFT's shape (1, out, 1, ...), which broadcasts over the output
    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        m = cast(nn.Conv2d, module)
        return (1, m.out_channels, *([1] * len(m.kernel_size)))

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, cast(nn.Conv2d, module)._conv_forward(x, weight, None))

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Conv2d, module)
        return _CONV_FN[len(m.kernel_size)](m._conv_forward(x, ad.A, None) * s, ad.B, groups=m.groups)

    def add_bias(self, module: nn.Module, y: torch.Tensor) -> torch.Tensor:
        bias = cast(nn.Conv2d, module).bias
        return y if bias is None else y + bias.view(-1, *([1] * (y.dim() - 2)))


class EmbeddingHandler(LayerHandler):
    """``nn.Embedding`` (num_embeddings V, dim D): A ``(r, V)``, B ``(D, r)``.

    ``y[t] = W[ids[t]] + s * B A[:, ids[t]]``; delta W = ``(B A)^T``, shape ``(V, D)``.
    Default init draws A ~ N(0, 1) (a Kaiming bound of 1/sqrt(V) would make the
    looked-up rows tiny) and B = 0. No dropout on token ids.
    """

    kind = "embedding"

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = cast(nn.Embedding, module)
        return (r, m.num_embeddings), (m.embedding_dim, r)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        with torch.no_grad():
            nn.init.normal_(A, std=1.0 / r if init == "gaussian" else 1.0)
            if init == "random":
                nn.init.normal_(B)
            else:
                B.zero_()

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        y = F.embedding(x, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        for ad in module._lora_live:
            h = F.embedding(x, ad.A.t(), m.padding_idx) * ad.scaling.to(ad.A.dtype)
            y = y + F.linear(h, ad.B)
        return y

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).t()

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        y = F.embedding(x, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return embedding_mixed(m, x, y, plan)

    # DoRA, PEFT's convention for embeddings: one magnitude per embedding dimension, the norm over the vocabulary
    dora_dim: int | None = 1
    branch_dropout = False

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        return F.embedding(x, weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(x, ad.A.t(), cast(nn.Embedding, module).padding_idx) * s, ad.B)


register(nn.Linear, LinearHandler())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_conv, ConvHandler())
register(nn.Embedding, EmbeddingHandler())
