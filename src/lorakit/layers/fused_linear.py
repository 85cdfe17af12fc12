"""A fused LoRA Linear: base + one adapter in one autograd node, with a hand-written backward.

For x of shape (N, in) (leading dims flattened), W (out, in), A (r, in), B (out, r),
scaling s, dropout p, c = s / (1 - p) and M the 0/1 keep mask of the dropout:

    y  = x W^T + b + h B^T,      h = c * (M * x) A^T          (N, r)

Backward, from dy (N, out), with g = c * dy B (N, r):

    dB = dy^T h                          (out, r)
    dA = g^T (M * x)                     (r, in)
    dx = dy W + M * (g A)
    dW = dy^T x, db = sum(dy)            only when the base weight/bias train

Two forms of the same arithmetic, chosen per call from the shapes. A rank-r update
``y += h B^T`` (or ``dx += g A``) is a skinny K=r GEMM that reads and writes the whole
N x out (or N x in) result: on a CPU it runs near memory speed, not GEMM speed. Without
dropout the weight form folds it into the big GEMM instead: ``y = x (W + s B A)^T + b``
and ``dx = dy (W + s B A)``, which costs one ``out x in`` K=r GEMM to build ``W + s B A``
(a transient, never saved) in place of the N-row update. That is cheaper once N is
larger than about ``MERGE_ROWS`` times the other side (in for the forward, out for the
backward): see :data:`MERGE_ROWS`. With B = 0 both forms give the base bitwise.

Dropout zeroes each element of the LoRA input independently with probability p and
scales the rest by 1/(1-p). Instead of drawing N x in random numbers (on a CPU that
costs about half a GEMM) and storing the dropped copy and its mask (2 x N x in, what
autograd's dropout keeps), only the *positions* of the dropped elements are drawn: the
gaps between consecutive dropped positions of an i.i.d. Bernoulli(p) sequence are
i.i.d. Geometric(p), so k ~ n p draws give exactly the same distribution. They are
regenerated in backward from a per-call seed, so dropout stores nothing. ``M * x`` is
made by zeroing the k dropped elements of x in place, running the GEMM and writing the
k values back (x is an activation autograd owns; its version counter is left alone
because the values are the same before and after), and ``M * (g A)`` by saving dx's k
values at the dropped positions before ``dx += g A`` and putting them back after. Only
k-element gathers and scatters are added to the dropout-free step; no N x in copy.

Saved for backward: x (the caller's own tensor, no copy; q/k/v reading one x share it)
and h (N x r). ``dA`` is what needs x, and a frozen model's backward keeps no layer
inputs, so x is most of LoRA's extra activation memory. When x is a product ``a * b``
whose backward already keeps both factors (a gated MLP's ``act(gate) * up`` feeding
``down_proj``), or ``gelu(h)`` whose backward keeps h, the layer keeps those instead
and recomputes x in backward: one elementwise pass in place of an N x in tensor. See
:func:`rebuilt_from`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_SEED_MAX = 2**62


def dropped_positions(n: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted flat indices in [0, n) of an i.i.d. Bernoulli(p) selection, reproducible from ``seed``.

    Positions are cumulative sums of Geometric(p) gaps (support 1, 2, ...), which is
    exactly the Bernoulli process; a gap is ``floor(log(U) / log(1 - p)) + 1`` for
    uniform U in (0, 1] (cheaper than ``geometric_``). The sums are taken in float64,
    exact below 2**53. Draws continue until the sum passes ``n``.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    inv_log_q = 1.0 / math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean * (1.0 - p) + 1.0)) + 16
    parts = []
    last = -1.0
    while last < n:
        u = torch.rand(chunk, dtype=torch.float64, device=device, generator=gen)
        # 1 - u is in (0, 1]: log never sees 0
        gaps = torch.log(torch.sub(1.0, u, out=u), out=u).mul_(inv_log_q).floor_().add_(1.0)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = float(pos[-1])
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    # sorted: cut at the first position >= n instead of masking
    keep = int(torch.searchsorted(out, float(n)))
    return out[:keep].to(torch.int64)


# The weight form replaces an N-row rank-r update by building W + s B A (out x in).
# Measured per element on this repository's CPU (1 thread, r=16, fp32): the update
# costs 0.7-0.9 ns per element of the N-row result, building the merged weight
# 1.2 ns per weight element; so the weight form wins once N > ~1.5 x the other side.
MERGE_ROWS = 1.5


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous (N, features) matrix (a view when x is contiguous)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _dropped_product(
    x2: torch.Tensor, pos: torch.Tensor, other: torch.Tensor, *, left: bool, owned: bool
) -> torch.Tensor:
    """``(M * x2) @ other`` (left=False) or ``other @ (M * x2)`` (left=True), M zero at ``pos``.

    ``owned``: x is an activation autograd made in this graph (fresh torch memory). It is
    then zeroed in place at the k positions through ``.data`` (so its version counter is
    untouched: every value is restored) and restored after the GEMM. Any other tensor
    (a caller's input, perhaps read-only memory) is copied instead.
    """
    # index_select/index_fill_/index_copy_: about 2x faster than flat[pos] reads and writes
    if not owned:
        xm = x2.clone()
        xm.view(-1).index_fill_(0, pos, 0)
        return other @ xm if left else xm @ other
    data = x2.data
    flat = data.view(-1)
    kept = flat.index_select(0, pos)
    flat.index_fill_(0, pos, 0)
    try:
        return other @ data if left else data @ other
    finally:
        flat.index_copy_(0, pos, kept)


def rebuilt_from(x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """How to recompute x bitwise from tensors its own backward node already keeps, or None.

    ``("mul", a, b)``: x = a * b, a ``MulBackward0`` that kept both factors (a gated
    MLP's ``act(gate) * up``). ``("gelu:none" | "gelu:tanh", h, None)``: x = gelu(h), a
    ``GeluBackward0``, which keeps its input (BERT's intermediate activation). Keeping
    these instead of x costs no memory, and :func:`rebuild` repeats the same kernel on
    the same inputs in backward: one elementwise pass (measured per layer here: 1.6 ms
    for a 1024 x 1376 product, 5.2 ms for a 2048 x 1536 gelu, about 0.3 % and 1.2 % of a
    LLaMA-style and a MiniLM step). Not taken while saved-tensor hooks are active
    (checkpointing, offloading: reading a kept tensor would run their unpack) or inside
    ``torch.compile`` (which cannot trace ``grad_fn``), nor when x is a leaf, a view, or
    a broadcast or type-promoted product.
    """
    if torch.compiler.is_compiling() or _hooks_active():
        return None
    try:
        return _kept_sources(x)
    except RuntimeError:  # the node's saved tensors were already freed by a backward
        return None


def _kept_sources(x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    fn = x.grad_fn
    name = fn.name() if fn is not None else ""
    if name == "MulBackward0":
        a, b = node_saved(fn, "_saved_self"), node_saved(fn, "_saved_other")
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return None  # a factor that needs no gradient is not kept
        if a.shape != x.shape or b.shape != x.shape or a.dtype != x.dtype or b.dtype != x.dtype:
            return None
        return "mul", a, b
    if name == "GeluBackward0":
        h, approximate = node_saved(fn, "_saved_self"), node_saved(fn, "_saved_approximate")
        if isinstance(h, torch.Tensor) and approximate in ("none", "tanh") and h.shape == x.shape:
            return f"gelu:{approximate}", h, None
    return None


def rebuild(kind: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x from what :func:`rebuilt_from` kept (``kind == ""``: a is x itself)."""
    if kind == "mul":
        assert b is not None
        return a * b
    if kind.startswith("gelu:"):
        return F.gelu(a, approximate=kind[5:])
    return a


# -- torch internals: each read in one function, with a plain fallback -------------------------
# Both only decide whether x may be rebuilt in backward instead of kept. Each fallback keeps x:
# more memory for that layer, the same numbers (tests/unit/test_fused_fallbacks.py).


def node_saved(fn: Any, name: str) -> object | None:
    """What autograd node ``fn`` saved as ``name`` (``_saved_self``, ``_saved_other``,
    ``_saved_approximate``: private attributes of torch's generated backward nodes), or None.

    Fallback: a torch without the attribute gives None, and :func:`rebuilt_from` then finds no
    source, so the layer keeps x itself.
    """
    return getattr(fn, name, None)


def _hooks_active() -> bool:
    """True while saved-tensor hooks are installed (checkpointing, offloading).

    torch keeps their stack in C++; the private ``torch._C._autograd._top_saved_tensors_default_hooks``
    is the only way to see it. Fallback: a torch without it (or with another signature) counts
    as hooks active, so the layer keeps x itself.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except (TypeError, RuntimeError):
        return True


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
        x2 = _rows(x)
        n, n_in = x2.shape
        c = scaling / (1.0 - p) if p > 0 else scaling
        # only dropout writes into x (torch.compile cannot trace grad_fn, so p=0 never asks)
        owned = p > 0 and x.grad_fn is not None and not x.is_inference()
        h: torch.Tensor | None = None
        if p == 0 and n > MERGE_ROWS * n_in:
            y = F.linear(x2, torch.addmm(weight, B * c, A), bias)
            if B.requires_grad:  # h is only needed for dB
                h = (x2 @ A.t()).mul_(c)
        else:
            y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            if p > 0:
                pos = dropped_positions(x2.numel(), p, seed, x2.device)
                h = _dropped_product(x2, pos, A.t(), left=False, owned=owned).mul_(c)
            else:
                h = (x2 @ A.t()).mul_(c)
            y.addmm_(h, B.t())
        kind, *sources = (rebuilt_from(x) if A.requires_grad or weight.requires_grad else None) or ("", x, None)
        ctx.save_for_backward(*sources, weight, A, B, h, scaling)
        ctx.p, ctx.seed, ctx.has_bias, ctx.owned, ctx.rebuild = p, seed, bias is not None, owned, kind
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        a, b, weight, A, B, h, scaling = ctx.saved_tensors
        x = rebuild(ctx.rebuild, a, b)
        p = ctx.p
        c = scaling / (1.0 - p) if p > 0 else scaling
        x2 = _rows(x)
        dy2 = _rows(dy)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = dA = dB = None
        if need_x or need_a:
            g = (dy2 @ B).mul_(c)  # (N, r)
            pos = dropped_positions(x2.numel(), p, ctx.seed, x2.device) if p > 0 else None
            if need_x:
                if pos is None and dy2.shape[0] > MERGE_ROWS * dy2.shape[1]:
                    dx = dy2 @ torch.addmm(weight, B * c, A)
                else:
                    dx = dy2 @ weight
                    if pos is None:
                        dx.addmm_(g, A)
                    else:  # M * (g A): the dropped positions keep dy W only
                        flat = dx.view(-1)
                        kept = flat.index_select(0, pos)
                        dx.addmm_(g, A)
                        flat.index_copy_(0, pos, kept)
                dx = dx.reshape(x.shape)
            if need_a:
                dA = g.t() @ x2 if pos is None else _dropped_product(x2, pos, g.t(), left=True, owned=ctx.owned)
        if need_bb:
            dB = (h.t() @ dy2).t()  # r x out then transposed: faster than dy^T h for tall dy
        if need_w:
            dw = dy2.t() @ x2
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db, dA, dB, None, None, None


def new_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator (so torch.manual_seed makes runs repeat)."""
    return int(torch.randint(_SEED_MAX, (1,)).item())
