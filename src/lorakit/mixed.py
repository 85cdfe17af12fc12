"""Mixed batches: one forward in which every sample uses its own adapter (or none).

Inside ``with lorakit.mixed_batch(model, ["a", None, "b", "a"]):`` sample ``n``
of the batch gets the delta of the adapter named at position ``n``; ``None``
means the base model. This is for serving many tenants or tasks from one base.

How it stays fast: on entry each LoRA layer stacks the factors of the adapters used
once (zero-padded to the largest rank: zero rows and columns add nothing), and every
forward inside the block runs a fixed handful of batched products for the whole batch,
whatever the number of distinct adapters K:

    Linear     samples grouped by adapter into a (G, S) grid (see linear_mixed):
               h = x_g (s_g A_g)^T and y_g = h B_g^T as two bmm's, added back per sample
    Conv       stacks with an all-zero "no adapter" slot K; the batch is folded into
               channels, (1, N*C, H, W), and A, B become one grouped conv each with
               N*G groups (sample n, group g -> group n*G+g)
    Embedding  one lookup in the stacked table (K+1)*V x r with ids offset by i_n*V

PEFT instead loops in Python over the distinct adapters with index lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from . import owned
from .adapters import _names, active_adapters
from .errors import MixedBatchError
from .inject import lora_layers
from .layers import LoraAdapter, LoraLayer, adapter_dict


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


def _grid(index: torch.Tensor, k: int) -> Grid:
    counts = torch.bincount(index, minlength=k + 1)[:k].tolist()
    size = max(1, -(-sum(counts) // max(1, k)))
    order = torch.argsort(index, stable=True).tolist()
    samples: list[int] = []
    slots: list[int] = []
    keep: list[float] = []
    start = 0
    for slot, count in enumerate(counts):
        mine = order[start : start + count]
        start += count
        for i in range(0, count, size):
            chunk = mine[i : i + size]
            pad = size - len(chunk)
            samples += chunk + [chunk[0]] * pad
            keep += [1.0] * len(chunk) + [0.0] * pad
            slots.append(slot)
    rows = len(slots)
    padded = torch.tensor(keep).view(rows, size, 1) if 0.0 in keep else None
    return Grid(
        samples=torch.tensor(samples, dtype=torch.long),
        slot=torch.tensor(slots, dtype=torch.long),
        keep=padded,
        rows=rows,
        size=size,
        identity=slots == list(range(k)),
    )


def _stacked_plan(layer: LoraLayer, present: list[LoraAdapter | None], index: torch.Tensor) -> MixedPlan:
    handler = layer.lora_handler
    weight = getattr(layer, handler.weight_name)
    r_max = max([ad.r for ad in present if ad is not None], default=0) or 1
    a_shape, b_shape = handler.factor_shapes(layer, r_max)
    A = torch.zeros((len(present) + 1, *a_shape), dtype=weight.dtype, device=weight.device)
    B = torch.zeros((len(present) + 1, *b_shape), dtype=weight.dtype, device=weight.device)
    s = torch.zeros(len(present) + 1, dtype=weight.dtype, device=weight.device)
    for k, ad in enumerate(present):
        if ad is not None:
            handler.pad_rank(layer, ad.A, ad.B, A[k], B[k])
            s[k] = ad.scaling
    return MixedPlan(index=index.to(weight.device), A=A, B=B, scaling=s)


def _linear_plan(layer: LoraLayer, present: list[LoraAdapter | None], index: torch.Tensor, grid: Grid) -> MixedPlan:
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


def _plan(layer: LoraLayer, names: tuple[str, ...], index: torch.Tensor, grid: Grid | None) -> MixedPlan:
    adapters = adapter_dict(layer)
    present = [adapters.get(n) for n in names]
    if layer.lora_handler.kind != "linear":
        return _stacked_plan(layer, present, index)
    if all(ad is None for ad in present):  # no sample uses an adapter this layer has
        return MixedPlan(index=index)
    if len(present) == 1:
        ad = cast(LoraAdapter, present[0])
        mask = torch.where(index.to(ad.A.device) == 0, ad.scaling, 0.0).to(ad.A.dtype).view(-1, 1)
        return MixedPlan(index=index, A_cat=ad.A, B_cat=ad.B, mask=mask)
    assert grid is not None  # mixed_batch makes one whenever the batch names several adapters
    return _linear_plan(layer, present, index, grid)


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None] | str) -> Iterator[nn.Module]:
    """Run the next forwards with one adapter per sample: ``names[n]`` for sample ``n``.

    The model must be in eval mode with nothing merged; the active adapters are
    ignored inside the block. Every forward inside must have batch size
    ``len(names)`` (dimension 0).

    Raises:
        MixedBatchError: training mode, merged adapters, adapters that train modules or
            biases fully, or a batch size mismatch; and merge, unmerge, set_adapter or
            delete_adapter inside the block.
        AdapterNotFoundError: a name the model does not have.
    """
    if model.training:
        raise MixedBatchError("mixed_batch needs model.eval(): per-sample adapters are for inference")
    if isinstance(names, str):  # one string is one name: a batch of one, never its characters
        names = [names]
    wanted = tuple(dict.fromkeys(n for n in names if n is not None))
    _names(model, wanted)
    trains = [n for n in wanted if owned.owned_by(model, n)]
    if trains:
        raise MixedBatchError(
            f"adapters {trains} train modules or biases fully (train_modules/bias); those cannot differ per "
            "sample: run their samples with set_adapter instead"
        )
    slot = {n: k for k, n in enumerate(wanted)}
    index = torch.tensor([slot[n] if n is not None else len(wanted) for n in names], dtype=torch.long)
    layers = [(path, layer) for path, layer in lora_layers(model)]
    for path, layer in layers:
        if layer.lora_merged:
            raise MixedBatchError(f"{path}: adapters {list(layer.lora_merged)} are merged; unmerge first")
    grid = _grid(index, len(wanted)) if len(wanted) > 1 else None
    active = active_adapters(model)
    owned.install(model, owned.live(model, ()))  # rows without an adapter are the base's
    try:
        with torch.no_grad():  # the plan is a copy of the factors, not part of any graph
            for _, layer in layers:
                layer._lora_mixed = _plan(layer, wanted, index, grid)
        yield model
    finally:
        for _, layer in layers:
            layer._lora_mixed = None
        owned.install(model, owned.live(model, active))


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
