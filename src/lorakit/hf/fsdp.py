"""``hf train fsdp=True``: the adapted model sharded across the ``torchrun`` processes with
FSDP2 (``torch.distributed.fsdp.fully_shard``), for models that do not fit one device.

Each transformer block (the classes the model lists in ``_no_split_modules``; a model that
lists none is one unit, gathered whole) and then the rest of the model become one FSDP2
unit each: every parameter, the frozen base and the trainable
adapters alike, is a ``DTensor`` holding 1/N of it on each process, gathered for a block's
forward and backward and freed after; the adapters' gradients are reduce-scattered
(averaged over the processes, as DDP averages them), so each process's AdamW updates its
own shard.

Why lorakit shards the model itself rather than through ``TrainingArguments(fsdp=...)``:
accelerate (1.16) turns a run into FSDP only for GPU-type setups; on the CPU (gloo) it
silently runs DDP instead (probed: the model came back wrapped in DistributedDataParallel).
The sharded model is handed to ``Trainer`` marked as sharded at load time
(:func:`shard`), transformers' own path for a model that owns its sharding.

What reads the whole tensors joins a collective on every process: saving the adapter
(:func:`lorakit.io.encode_adapter` gathers each tensor; the main process writes). The
optimizer state stays sharded: each process saves and loads its own shard
(:mod:`lorakit.hf.checkpoints`).
"""

from __future__ import annotations

import torch
from torch import nn


def shard(model: nn.Module, device: str) -> None:
    """Shard ``model`` in place over all processes of the default process group on ``device``
    (``cpu``: gloo; ``cuda``: each process's current GPU), block by block (module docstring).

    Call it after the adapters are injected or loaded and before the optimizer is built: the
    optimizer must hold the sharded parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # transformers' Trainer flag for a model sharded at load time (FSDP2 by transformers itself):
    # with it, Trainer neither moves the model nor wraps it in DDP, and it builds the optimizer
    # over the DTensor shards. It is read once, when the Trainer is built.
    setattr(model, "_is_distributed_loading_by_transformers", True)  # noqa: B010  (a private attribute)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was sharded by FSDP2 (:func:`shard`, or ``fully_shard`` by hand)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
