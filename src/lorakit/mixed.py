"""Mixed batches: one forward in which every sample uses its own adapter (or none).

Inside ``with lorakit.mixed_batch(model, ["a", None, "b", "a"]):`` sample ``n``
of the batch gets the delta of the adapter named at position ``n``; ``None``
means the base model. This is for serving many tenants or tasks from one base.

How it stays fast: on entry each LoRA layer stacks the factors of the adapters used
once (zero-padded to the largest rank: zero rows and columns add nothing), and every
forward inside the block runs a fixed handful of batched products for the whole batch,
whatever the number of distinct adapters; PEFT instead loops in Python over the
distinct adapters with index lists. The plan and the kernels, with how each layer type
batches, are in :mod:`lorakit.mixed_kernels` (re-exported here); this module builds the
plans and runs the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from . import owned
from .adapters import _names, active_adapters
from .errors import MixedBatchError
from .layer_base import LoraAdapter, LoraLayer, adapter_dict
from .mixed_kernels import Grid, MixedPlan, check_batch, conv_mixed, embedding_mixed, linear_mixed
from .state import lora_layers

__all__ = ["Grid", "MixedPlan", "check_batch", "conv_mixed", "embedding_mixed", "linear_mixed", "mixed_batch"]


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
        MixedBatchError: training mode, merged adapters, DoRA adapters, adapters that train modules or
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
        dora = [n for n in wanted if n in layer.lora and cast(LoraAdapter, layer.lora[n]).variant != "lora"]
        if dora:
            raise MixedBatchError(
                f"{path}: adapters {dora} are DoRA adapters; their per-channel magnitude rescales the base output, "
                "which mixed batches share across samples: run their samples with set_adapter instead"
            )
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
