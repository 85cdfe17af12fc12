"""Mixed batches: one forward in which every sample uses its own adapter (or none).

Inside ``with lorakit.mixed_batch(model, ["a", None, "b", "a"]):`` sample ``n``
of the batch gets the delta of the adapter named at position ``n``; ``None``
means the base model. This is for serving many tenants or tasks from one base.

How it stays fast: on entry each LoRA layer stacks the factors of the adapters
used, zero-padded to the largest rank (zero rows/columns add nothing), plus
one all-zero "no adapter" slot::

    A_stack (K+1, r_max, in)    B_stack (K+1, out, r_max)    s (K+1,)

and the forward gathers each sample's factors and runs *one* batched product
for the whole batch, whatever the number of distinct adapters:

    Linear     h[n] = s[i_n] * x[n] A[i_n]^T   (bmm)      y[n] += h[n] B[i_n]^T
    Conv       the batch is folded into channels, (1, N*C, H, W), and A, B become
               one grouped conv each with N*G groups (sample n, group g -> group n*G+g)
    Embedding  one lookup in the concatenated table (K+1)*V x r with ids offset by i_n*V

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

from .adapters import _names
from .errors import LoraError
from .inject import lora_layers
from .layers import LoraAdapter, LoraLayer


class MixedBatchError(LoraError, ValueError):
    """A mixed batch cannot run: training mode, merged adapters, or a batch of another size."""


@dataclass(frozen=True)
class MixedPlan:
    """One layer's stacked factors for a mixed batch (see the module docstring)."""

    index: torch.Tensor  # (N,) slot per sample; slot K is "no adapter"
    A: torch.Tensor  # (K+1, r_max, *A_shape[1:])
    B: torch.Tensor  # (K+1, *B_shape with rank dim r_max)
    scaling: torch.Tensor  # (K+1,), 0 for the "no adapter" slot


def _plan(layer: LoraLayer, names: tuple[str, ...], index: torch.Tensor) -> MixedPlan:
    handler = layer.lora_handler
    weight = getattr(layer, handler.weight_name)
    present = [cast(LoraAdapter, layer.lora[n]) if n in layer.lora else None for n in names]
    r_max = max([ad.r for ad in present if ad is not None], default=0)
    if r_max == 0:  # no sample uses an adapter this layer has: the base is enough
        r_max = 1
    a_shape, b_shape = handler.factor_shapes(layer, r_max)
    A = torch.zeros((len(names) + 1, *a_shape), dtype=weight.dtype, device=weight.device)
    B = torch.zeros((len(names) + 1, *b_shape), dtype=weight.dtype, device=weight.device)
    s = torch.zeros(len(names) + 1, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for k, ad in enumerate(present):
            if ad is not None:
                handler.pad_rank(layer, ad.A, ad.B, A[k], B[k])
                s[k] = ad.scaling
    return MixedPlan(index=index.to(weight.device), A=A, B=B, scaling=s)


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run the next forwards with one adapter per sample: ``names[n]`` for sample ``n``.

    The model must be in eval mode with nothing merged; the active adapters are
    ignored inside the block. Every forward inside must have batch size
    ``len(names)`` (dimension 0).

    Raises:
        MixedBatchError: training mode, merged adapters, or a batch size mismatch.
        AdapterNotFoundError: a name the model does not have.
    """
    if model.training:
        raise MixedBatchError("mixed_batch needs model.eval(): per-sample adapters are for inference")
    wanted = tuple(dict.fromkeys(n for n in names if n is not None))
    _names(model, wanted)
    slot = {n: k for k, n in enumerate(wanted)}
    index = torch.tensor([slot[n] if n is not None else len(wanted) for n in names], dtype=torch.long)
    layers = [(path, layer) for path, layer in lora_layers(model)]
    for path, layer in layers:
        if layer.lora_merged:
            raise MixedBatchError(f"{path}: adapters {list(layer.lora_merged)} are merged; unmerge first")
    try:
        for _, layer in layers:
            layer._lora_mixed = _plan(layer, wanted, index)
        yield model
    finally:
        for _, layer in layers:
            layer._lora_mixed = None


def check_batch(plan: MixedPlan, x: torch.Tensor) -> int:
    n = plan.index.shape[0]
    if x.shape[0] != n:
        raise MixedBatchError(f"mixed_batch was given {n} adapter names but the batch has {x.shape[0]} samples")
    return n


def linear_mixed(x: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """``y[n] += s_n * x[n] A_n^T B_n^T`` with one gather and two bmm's."""
    n = check_batch(plan, x)
    xs = x.reshape(n, -1, x.shape[-1])
    A = plan.A[plan.index]  # (N, r, in)
    B = plan.B[plan.index]  # (N, out, r)
    h = torch.bmm(xs, A.transpose(1, 2)) * plan.scaling[plan.index].view(n, 1, 1)
    return y + torch.bmm(h, B.transpose(1, 2)).reshape(y.shape)


def conv_mixed(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """Per-sample conv LoRA as one grouped conv pair over the batch folded into channels."""
    m = cast(nn.Conv2d, layer)
    n = check_batch(plan, x)
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
    v = m.num_embeddings
    table = plan.A.transpose(1, 2).reshape(-1, plan.A.shape[1])  # ((K+1)*V, r)
    offset = (plan.index * v).view(n, *([1] * (ids.dim() - 1)))
    h = F.embedding(ids + offset, table) * plan.scaling[plan.index].view(n, *([1] * ids.dim()))
    B = plan.B[plan.index]  # (N, D, r)
    d = torch.bmm(h.reshape(n, -1, h.shape[-1]), B.transpose(1, 2))
    return y + d.reshape(y.shape)
