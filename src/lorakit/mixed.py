"""Mixed batches: one forward in which every sample uses its own adapter (or none).

Inside ``with lorakit.mixed_batch(model, ["a", None, "b", "a"]):`` sample ``n``
of the batch gets the delta of the adapter named at position ``n``; ``None``
means the base model. This is for serving many tenants or tasks from one base.

How it stays fast: on entry each LoRA layer stacks the factors of the adapters used
once (zero-padded to the largest rank: zero rows and columns add nothing), and every
forward inside the block runs a fixed handful of batched products for the whole batch,
whatever the number of distinct adapters; PEFT instead loops in Python over the
distinct adapters with index lists. Each layer type's handler builds its plan
(:meth:`~lorakit.layers.base.LayerHandler.mixed_plan`) and runs its kernel
(``mixed_forward``); the kernels live with their layer types in :mod:`lorakit.layers`
(re-exported here). This module groups the samples and runs the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from . import owned
from .adapters import _names, active_adapters
from .errors import MixedBatchError
from .layers.base import LoraAdapter, LoraLayer, adapter_dict
from .layers.conv import conv_mixed
from .layers.embedding import embedding_mixed
from .layers.linear import linear_mixed
from .layers.mixed_plan import Grid, MixedPlan, check_batch
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


def _plan(layer: LoraLayer, names: tuple[str, ...], index: torch.Tensor, grid: Grid | None) -> MixedPlan:
    adapters = adapter_dict(layer)
    return layer.lora_handler.mixed_plan(layer, [adapters.get(n) for n in names], index, grid)


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
