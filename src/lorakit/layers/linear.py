"""LoRA on ``nn.Linear``: the handler, its inference forms, and its per-sample kernel.

``y = x W^T + b + s (dropout(x) A^T) B^T`` with A ``(r, in)``, B ``(out, r)``; delta W = B A.
One adapter in training runs as one fused autograd node (:mod:`lorakit.layers.fused_linear`);
without autograd, :func:`_linear_inference` picks the cheaper of two equal forms. Mixed
batches (:func:`linear_mixed`) group the samples by adapter into a grid and run two bmm's.
Files use PEFT's Linear keys (``lora_A.weight``, ``lora_B.weight``), the defaults.

Handlers of Linear-shaped layers elsewhere (transformers' ``Conv1D``, the "parts" layers of
:mod:`lorakit.hf`) subclass :class:`LinearHandler`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, LoraAdapter, LoraLayer, register
from .fused_linear import LoraLinearFn, new_seed
from .mixed_plan import Grid, MixedPlan, check_batch

__all__ = ["LinearHandler", "linear_mixed"]


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
            # Training: one adapter fused into one autograd node (see lorakit.layers.fused_linear).
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

    def mixed_plan(
        self, module: LoraLayer, present: list[LoraAdapter | None], index: torch.Tensor, grid: Grid | None
    ) -> MixedPlan:
        """One adapter: its own factors and a per-sample mask (s or 0); several: the grid's rows
        (:func:`linear_mixed` reads both)."""
        if all(ad is None for ad in present):  # no sample uses an adapter this layer has
            return MixedPlan(index=index)
        if len(present) == 1:
            ad = cast(LoraAdapter, present[0])
            mask = torch.where(index.to(ad.A.device) == 0, ad.scaling, 0.0).to(ad.A.dtype).view(-1, 1)
            return MixedPlan(index=index, A_cat=ad.A, B_cat=ad.B, mask=mask)
        assert grid is not None  # mixed_batch makes one whenever the batch names several adapters
        return _grid_plan(module, present, index, grid)

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        m = cast(nn.Linear, module)
        return linear_mixed(x, F.linear(x, m.weight, m.bias), plan)

    dora_dim: int | None = 0  # DoRA: one magnitude per output row, the norm over the inputs

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, ad.A) * s, ad.B)


def _grid_plan(layer: LoraLayer, present: list[LoraAdapter | None], index: torch.Tensor, grid: Grid) -> MixedPlan:
    """Several adapters: each grid row's factors, ``(s A)^T`` and ``B^T`` (see :func:`linear_mixed`)."""
    weight = cast(nn.Linear, layer).weight
    out, n_in = weight.shape
    dtype, device = weight.dtype, weight.device
    first = next(ad for ad in present if ad is not None)
    r_max = max(ad.r for ad in present if ad is not None)
    # A handful of operations per layer whatever K is: one stack per factor and the
    # scaling folded into A. The stacks keep the factors' own layout, read transposed
    # by bmm: stacking transposed copies cost 4-6x more than the bmm's lose by it.
    a: list[torch.Tensor] = []
    b: list[torch.Tensor] = []
    scale: list[torch.Tensor] = []
    for ad in present:
        if ad is None:
            a.append(first.A.new_zeros(r_max, n_in))
            b.append(first.B.new_zeros(out, r_max))
            scale.append(first.scaling.new_zeros(()))
            continue
        pad = r_max - ad.r
        a.append(F.pad(ad.A, (0, 0, 0, pad)) if pad else ad.A)
        b.append(F.pad(ad.B, (0, pad)) if pad else ad.B)
        scale.append(ad.scaling)
    sA = torch.stack(a).to(dtype).mul_(torch.stack(scale).to(dtype).view(-1, 1, 1))  # (K, r, in)
    B = torch.stack(b).to(dtype)  # (K, out, r)
    if not grid.identity:
        slot = grid.slot.to(device)
        sA, B = sA.index_select(0, slot), B.index_select(0, slot)
    keep = grid.keep.to(device, dtype) if grid.keep is not None else None
    samples = grid.samples.to(device)
    return MixedPlan(index=index, grid=grid, At=sA.transpose(1, 2), Bt=B.transpose(1, 2), samples=samples, keep=keep)


def linear_mixed(x: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """``y[n] += s_n * x[n] A_n^T B_n^T`` for N samples of L tokens each, K adapters.

    One adapter (K = 1): ``y += (x A^T * mask) B^T`` with the mask zeroing samples
    without it: two plain GEMMs, exact work.

    Several: the samples are grouped by adapter into a (G, S) grid (:class:`Grid`), so
    each grid row has one adapter's factors and the LoRA term is two bmm's over
    (G, S L, .) blocks; a gather of x's rows in and an ``index_add_`` of the results
    out. Work is the exact ``T r (in + out)`` up to the padding (at most about 2x), and
    the number of operations does not grow with K. Measured per layer on 512 x 512 and
    512 x 1376 (1 thread, r=16, 32 samples, balanced), at a decode step (1 token each)
    with K=8 this added 0.05-0.7 ms over the base GEMM. The forms it replaced added
    0.5-1.5 ms (a concatenated form, ``x [A_1; ...; A_K]^T``, K times the work) and
    2.8-3.7 ms (every sample's factors gathered). At 32 tokens each it was the cheapest
    of the three for K=8 and 32.
    """
    n = check_batch(plan, x)
    if plan.A_cat is not None and plan.B_cat is not None and plan.mask is not None:
        lead = y.shape
        h = F.linear(x, plan.A_cat).view(n, -1, plan.A_cat.shape[0]).mul_(plan.mask.view(n, 1, 1))
        out = lead[-1]
        return torch.addmm(y.reshape(-1, out), h.view(-1, h.shape[-1]), plan.B_cat.t()).view(lead)
    grid, At, Bt, samples = plan.grid, plan.At, plan.Bt, plan.samples
    if grid is None or At is None or Bt is None or samples is None:  # no sample uses an adapter
        return y
    xs = x.reshape(n, -1, x.shape[-1])
    tokens = xs.shape[1]
    xg = xs.index_select(0, samples).view(grid.rows, grid.size * tokens, -1)
    d = torch.bmm(torch.bmm(xg, At), Bt)  # (G, S L, out)
    if plan.keep is not None:
        d = d.view(grid.rows, grid.size, -1).mul_(plan.keep)
    out = y.shape[-1]
    if not y.is_contiguous():  # pragma: no cover - F.linear returns contiguous outputs
        return y.reshape(n, -1).index_add(0, samples, d.view(-1, tokens * out)).view(y.shape)
    # y is this layer's fresh base output: adding in place spares an N x L x out copy
    y.view(n, tokens * out).index_add_(0, samples, d.view(-1, tokens * out))
    return y


register(nn.Linear, LinearHandler())
