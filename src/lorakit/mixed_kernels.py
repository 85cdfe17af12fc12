"""The per-sample LoRA kernels of :func:`lorakit.mixed_batch` and the plan they read.

A plan (:class:`MixedPlan`) is one layer's factors stacked for the adapters a mixed batch
uses; :mod:`lorakit.mixed` builds it on entry to the block, and each handler's
``mixed_forward`` runs one of these kernels with it. They are here, below the layers,
because every layer type's handler calls them and they need nothing of lorakit but the
plan. How they stay fast, whatever the number of distinct adapters K:

    Linear     samples grouped by adapter into a (G, S) grid (see linear_mixed):
               h = x_g (s_g A_g)^T and y_g = h B_g^T as two bmm's, added back per sample
    Conv       stacks with an all-zero "no adapter" slot K; the batch is folded into
               channels, (1, N*C, H, W), and A, B become one grouped conv each with
               N*G groups (sample n, group g -> group n*G+g)
    Embedding  one lookup in the stacked table (K+1)*V x r with ids offset by i_n*V
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MixedBatchError


@dataclass(frozen=True)
class MixedPlan:
    """One layer's factors for a mixed batch, in the form its handler reads.

    Conv and Embedding read the stacks (K adapters plus an all-zero "no adapter" slot K,
    ranks zero-padded to the largest): ``A`` (K+1, r_max, *A_shape[1:]), ``B`` (K+1,
    *B_shape with rank r_max), ``scaling`` (K+1,). Linear reads, with one adapter, its
    own ``A_cat`` (r, in) and ``B_cat`` (out, r) and ``mask`` (N, 1), s where the sample
    uses it, else 0; with several, a :class:`Grid` and each grid row's factors as
    ``At`` (G, in, r_max) = (s A)^T and ``Bt`` (G, r_max, out) = B^T (transposed views).
    """

    index: torch.Tensor  # (N,) slot per sample; slot K is "no adapter"
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scaling: torch.Tensor | None = None
    A_cat: torch.Tensor | None = None
    B_cat: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    grid: Grid | None = None
    At: torch.Tensor | None = None
    Bt: torch.Tensor | None = None
    samples: torch.Tensor | None = None  # grid.samples on this layer's device
    keep: torch.Tensor | None = None  # grid.keep in this layer's dtype and device


@dataclass(frozen=True)
class Grid:
    """The samples that use an adapter, grouped by adapter into G rows of S samples.

    S is the balanced group size ``ceil(used / K)``; an adapter with more samples
    takes several rows, the last row of each adapter is padded. So at most
    ``K + used / S <= 2 K`` rows and fewer than ``K S`` padding slots: the batched
    products do at most about twice the exact LoRA work, and usually exactly it.

    Attributes:
        samples: (G * S,) sample index of each slot, row by row (padding repeats a real one).
        slot: (G,) the adapter slot of each row.
        keep: (G, S, 1) 1 for real slots, 0 for padding; None when nothing is padded.
        identity: the rows are the slots 0..K-1 in order (no factor needs repeating).
    """

    samples: torch.Tensor
    slot: torch.Tensor
    keep: torch.Tensor | None
    rows: int
    size: int
    identity: bool


def check_batch(plan: MixedPlan, x: torch.Tensor) -> int:
    n = plan.index.shape[0]
    if x.shape[0] != n:
        raise MixedBatchError(f"mixed_batch was given {n} adapter names but the batch has {x.shape[0]} samples")
    return n


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


def embedding_mixed(layer: nn.Module, ids: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """One lookup in the stacked ``(K+1) * V x r`` table, ids offset by ``slot * V``."""
    m = cast(nn.Embedding, layer)
    n = check_batch(plan, ids)
    assert plan.A is not None and plan.B is not None and plan.scaling is not None
    v = m.num_embeddings
    table = plan.A.transpose(1, 2).reshape(-1, plan.A.shape[1])  # ((K+1)*V, r)
    offset = (plan.index * v).view(n, *([1] * (ids.dim() - 1)))
    h = F.embedding(ids + offset, table) * plan.scaling[plan.index].view(n, *([1] * ids.dim()))
    B = plan.B[plan.index]  # (N, D, r)
    d = torch.bmm(h.reshape(n, -1, h.shape[-1]), B.transpose(1, 2))
    return y + d.reshape(y.shape)
