"""A fused LoRA Linear: base + one adapter in one autograd node, with a hand-written backward.

Forward, for x of shape (N, in) (leading dims flattened), W (out, in), A (r, in), B (out, r),
scaling s and dropout p:

    y  = x W^T + b                       one GEMM (addmm with the bias)
    h  = c * (x A^T - D)                 (N, r), c = s / (1 - p)
    y += h B^T                           accumulated into y in place (no out-wide temporary)

Dropout zeroes each element of the LoRA input independently with probability
p and scales the rest by 1/(1-p). Instead of drawing N x in random numbers
(on a CPU that costs about half a GEMM) and storing the dropped copy and its
mask (2 x N x in, what autograd's dropout keeps), we draw only the *positions*
of the dropped elements: the gaps between consecutive dropped positions of an
i.i.d. Bernoulli(p) sequence are i.i.d. Geometric(p), so k ~ n p draws give
exactly the same distribution. The dropped elements' contribution is then
removed sparsely:

    D[i] = sum over dropped (i, j) of x[i, j] * A[:, j]          k x r work

Backward, from dy (N, out), with g = c * dy B (N, r):

    dB = dy^T h                          (out, r)
    dA = g^T x - sparse(D-terms)         (r, in)
    dx = dy W + g A, then the dropped positions' low-rank part subtracted (k dot products)
    dW = dy^T x, db = sum(dy)            only when the base weight/bias train

Saved for backward: x (the caller's own tensor, no copy; q/k/v reading one x
share it) and h (N x r). The dropped positions are regenerated from a per-call
seed, so dropout costs no activation memory and about k * r extra work.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_SEED_MAX = 2**62


def dropped_positions(n: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted flat indices in [0, n) of an i.i.d. Bernoulli(p) selection, reproducible from ``seed``.

    Positions are cumulative sums of Geometric(p) gaps (support 1, 2, ...), which is
    exactly the Bernoulli process; a gap is ``floor(log(U) / log(1 - p)) + 1`` for
    uniform U (cheaper than ``geometric_``). Draws continue until the sum passes ``n``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    log_q = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - p) + 1.0)) + 16
    parts = []
    last = -1
    while last < n:
        u = torch.rand(chunk, dtype=torch.float64, device=device, generator=gen)
        gaps = u.log_().div_(log_q).floor_().add_(1).to(torch.int64)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out[out < n]


def _drop(x2: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A transient copy of ``x2`` with the dropped elements zeroed (never saved for backward)."""
    xm = x2.clone()
    xm.view(-1)[pos] = 0
    return xm


class LoraLinearFn(torch.autograd.Function):
    """``y = x W^T + b + s * (dropout(x) A^T) B^T`` with the backward in the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: torch.Tensor,
        p: float,
        seed: int,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if p > 0:
            xm = _drop(x2, dropped_positions(x2.numel(), p, seed, x2.device))
            h = (xm @ A.t()).mul_(scaling / (1.0 - p))
            del xm
        else:
            h = (x2 @ A.t()).mul_(scaling)
        y.addmm_(h, B.t())
        ctx.save_for_backward(x, weight, A, B, h, scaling)
        ctx.p, ctx.seed, ctx.has_bias = p, seed, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, A, B, h, scaling = ctx.saved_tensors
        p = ctx.p
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        if need_x or need_a:
            g = (dy2 @ B).mul_(scaling / (1.0 - p) if p > 0 else scaling)  # (N, r)
            pos = dropped_positions(x2.numel(), p, ctx.seed, x2.device) if p > 0 else None
            if need_x:
                if pos is None:
                    dx = (dy2 @ weight).addmm_(g, A)
                else:
                    low = g @ A
                    low.view(-1)[pos] = 0
                    dx = (dy2 @ weight).add_(low)
                dx = dx.reshape(x.shape)
            if need_a:
                dA = g.t() @ (x2 if pos is None else _drop(x2, pos))
        if need_bb:
            dB = dy2.t() @ h
        if need_w:
            dw = dy2.t() @ x2
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db, dA, dB, None, None, None


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (so torch.manual_seed makes runs repeat)."""
    return int(torch.randint(_SEED_MAX, (1,)).item())
