"""LoRA on ``nn.Conv1d/2d/3d``: the handler, its per-sample kernel and its file layout.

Convolutions (groups ``G``): ``A`` is a conv with the base kernel size,
stride, padding, dilation, padding mode and groups, mapping ``in -> r``;
``B`` is a grouped 1x1 conv ``r -> out``. Group ``g`` of the output then
depends only on group ``g`` of the input, exactly like the base conv, so the
composition is one conv with kernel ``delta W = B_g A_g`` per group and every
adapted conv, grouped and depthwise included, merges exactly. This needs
``r % G == 0`` (rank ``r / G`` per group).

Files (PEFT's layout): lorakit's A is ``(r, in/G, *k)`` applied with the base conv's
groups; PEFT's is dense ``(r, in, *k)``. Row ``rho`` of lorakit's A belongs to group
``g = rho // (r/G)`` and reads only input channels ``g*in/G .. (g+1)*in/G``, so the
dense form is block diagonal with zeros elsewhere, and PEFT computes the same outputs
from it. Mixed batches: the factors are stacked with an all-zero "no adapter" slot, the
batch is folded into channels, ``(1, N*C, H, W)``, and A, B become one grouped conv each
with ``N*G`` groups (sample n, group g -> group n*G+g).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from ..io_errors import AdapterFileError
from .base import LayerHandler, LoraAdapter, LoraLayer, live_rank, register
from .linear import LinearHandler
from .mixed_plan import MixedPlan, check_batch

__all__ = ["CONV_FORM_ATTR", "ConvHandler", "conv_mixed", "dense_conv_A", "grouped_conv_A", "is_channels_last"]

# A conv layer's measured form: ("weight" | "activation", the live rank it was measured for); see lorakit.conv_forms
CONV_FORM_ATTR = "lora_conv_form"


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
      (K = prod(k)), and is needed for dropout (which acts on A's input). Without
      groups, B (and A of a 1x1 conv) runs as a batched matrix product, not a thin conv.
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
    layer_state = (CONV_FORM_ATTR,)
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
        a_pointwise = _is_pointwise(m) and m.groups == 1
        for ad in live:
            xd = ad.drop(x)
            # A reuses the base conv's own padding/stride/dilation/groups path unless it is a plain 1x1
            pointwise = a_pointwise and _batched_contiguous(m, xd)
            h = _pointwise(ad.A, xd) if pointwise else m._conv_forward(xd, ad.A, None)
            h = h * ad.scaling.to(x.dtype)
            if m.groups == 1 and _batched_contiguous(m, h):
                y = y + _pointwise(ad.B, h)
            else:
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

    def rank_groups(self, module: nn.Module) -> int:
        return int(cast(nn.Conv2d, module).groups)  # rank rows are grouped, r/G per group

    # Mixed batches read the stacked factors (the protocol's default plan), not Linear's grid.
    mixed_plan = LayerHandler.mixed_plan

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

    # The file layout: PEFT's A is dense (module docstring); B is stored as it is.
    def file_factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        a, b = self.factor_shapes(module, r)
        return (a[0], cast(nn.Conv2d, module).in_channels, *a[2:]), b

    def to_file(self, module: nn.Module, factor: str, t: torch.Tensor) -> torch.Tensor:
        return dense_conv_A(t, cast(nn.Conv2d, module).groups) if factor == "A" else t

    def from_file(self, module: nn.Module, factor: str, t: torch.Tensor, file: Path, key: str) -> torch.Tensor:
        return grouped_conv_A(file, key, t, cast(nn.Conv2d, module).groups) if factor == "A" else t


def _is_pointwise(m: nn.Conv2d) -> bool:
    """A 1x1 kernel at stride 1 without padding: each output pixel is its input pixel times a matrix."""
    return (
        all(k == 1 for k in m.kernel_size)
        and all(s == 1 for s in m.stride)
        and (isinstance(m.padding, str) or all(p == 0 for p in m.padding))  # "valid"/"same" pad a 1x1 by 0
    )


def _batched_contiguous(m: nn.Conv2d, x: torch.Tensor) -> bool:
    return x.dim() == len(m.kernel_size) + 2 and (x.is_contiguous() or is_channels_last(x))


def is_channels_last(x: torch.Tensor) -> bool:
    """``x`` is 4-D and stored channels-last (each pixel's channels side by side), not also plain contiguous
    (a tensor with one channel, or 1 x 1 pixels, is both and counts as the usual layout)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _pointwise(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv (no groups, stride 1, no padding) as one batched matrix product:
    ``(out, in, 1..) x (N, in, *S) -> (N, out, *S)``. With ``r`` output or input channels this runs
    faster than the convolution kernels on a CPU, backward included (bench/conv_forms.py). ``bmm`` on
    the expanded weight, not ``matmul``: matmul folds the batch into the pixels through a transposed
    copy of ``x``, slower than the convolution. A channels-last ``x`` is already ``(N*H*W, in)`` in
    memory: one ``linear`` over all pixels, its result channels-last too."""
    n, c = x.shape[0], x.shape[1]
    if is_channels_last(x):
        return F.linear(x.permute(0, 2, 3, 1), w.reshape(w.shape[0], c)).permute(0, 3, 1, 2)
    out = torch.bmm(w.reshape(1, w.shape[0], c).expand(n, -1, -1), x.reshape(n, c, -1))
    return out.reshape(n, w.shape[0], *x.shape[2:])


def conv_mixed(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """Per-sample conv LoRA as one grouped conv pair over the batch folded into channels."""
    m = cast(nn.Conv2d, layer)
    n = check_batch(plan, x)
    assert plan.A is not None and plan.B is not None and plan.scaling is not None
    g = m.groups
    nd = len(m.kernel_size)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    A = plan.A[plan.index]  # (N, r, in/G, *k)
    r = A.shape[1]
    xs = x.reshape(1, n * x.shape[1], *x.shape[2:])
    if m.padding_mode != "zeros":
        xs = F.pad(xs, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        h = conv(xs, A.reshape(n * r, *A.shape[2:]), None, m.stride, 0, m.dilation, n * g)
    else:
        h = conv(xs, A.reshape(n * r, *A.shape[2:]), None, m.stride, m.padding, m.dilation, n * g)
    h = h.reshape(n, r, *h.shape[2:]) * plan.scaling[plan.index].view(n, *([1] * (nd + 1)))
    B = plan.B[plan.index]  # (N, out, r/G, 1..)
    d = conv(h.reshape(1, n * r, *h.shape[2:]), B.reshape(n * B.shape[1], *B.shape[2:]), groups=n * g)
    return y + d.reshape(y.shape)


def dense_conv_A(A: torch.Tensor, groups: int) -> torch.Tensor:
    """``(r, in/G, *k)`` -> block-diagonal ``(r, in, *k)`` (module docstring)."""
    if groups == 1:
        return A
    r, ig = A.shape[0], A.shape[1]
    rg = r // groups
    dense = A.new_zeros((r, ig * groups, *A.shape[2:]))
    for g in range(groups):
        dense[g * rg : (g + 1) * rg, g * ig : (g + 1) * ig] = A[g * rg : (g + 1) * rg]
    return dense


def grouped_conv_A(file: Path, key: str, dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`dense_conv_A`; raises if an off-block entry is not exactly zero."""
    if groups == 1:
        return dense
    r, cin = dense.shape[0], dense.shape[1]
    rg, ig = r // groups, cin // groups
    out = dense.new_empty((r, ig, *dense.shape[2:]))
    mask = torch.ones(dense.shape[:2], dtype=torch.bool)
    for g in range(groups):
        out[g * rg : (g + 1) * rg] = dense[g * rg : (g + 1) * rg, g * ig : (g + 1) * ig]
        mask[g * rg : (g + 1) * rg, g * ig : (g + 1) * ig] = False
    if bool((dense[mask] != 0).any()):
        raise AdapterFileError(
            file,
            f"tensor {key!r}: this grouped conv (groups={groups}) has a dense lora_A with non-zero weights across "
            "groups; lorakit keeps each group's LoRA inside its group (so it can merge exactly) and cannot "
            "represent it",
        )
    return out


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_conv, ConvHandler())
