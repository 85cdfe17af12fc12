"""``lorakit hf train`` checkpoints: finding the newest, the optimizer's files, the NaN stop error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import safetensors.torch
import torch

from ..errors import NonFiniteError
from ..io_format import atomic_write
from .data import DataError

KEEP_CHECKPOINTS = 2


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or Inf at ``step`` (``adapter``: the loss was finite, but
    the adapter held NaN/Inf after that step's update, found when saving it).

    The run stops before that step reaches the disk: ``checkpoint`` is the last good
    checkpoint (None when none was written yet).
    """

    def __init__(self, step: int, loss: float, checkpoint: Path | None, adapter: bool = False) -> None:
        self.step, self.loss, self.checkpoint, self.adapter = step, loss, checkpoint, adapter
        what = (
            f"the adapter holds NaN/Inf after the update of step {step} (loss {loss})"
            if adapter
            else f"the training loss at step {step} is {loss}"
        )
        where = (
            f"the last good checkpoint is {checkpoint} (resume=True continues from it; a lower lr may help)"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(f"hf train: {what}; stopped: {where}")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``out/checkpoints/step-N`` (one with its ``state.json``), or None."""
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _optimizer_file(shard: int | None) -> str:
    return "optimizer.safetensors" if shard is None else f"optimizer-{shard}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 ``DTensor``, any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else t


def save_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str], *, shard: int | None = None) -> None:
    """``optimizer.safetensors`` (the state tensors) and ``optimizer.json`` (the parameter groups
    and the trainable parameters' names, in the optimizer's order), written atomically.

    ``shard``: the parameters are FSDP2 shards (:mod:`lorakit.hf.fsdp`) and this is the process's
    rank: its own part of the state goes to ``optimizer-<shard>.safetensors`` (every process
    calls this), ``optimizer.json`` is written by shard 0. The state stays sharded: no process
    ever holds all of it, and a resume with the same processes (``run.json`` checks it) gives
    each its own part back.
    """
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": _local(v).contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    atomic_write(folder / _optimizer_file(shard), safetensors.torch.save(tensors, metadata={"format": "pt"}))
    if shard in (None, 0):
        meta = json.dumps({"param_groups": groups, "names": names}, indent=1).encode()
        atomic_write(folder / "optimizer.json", meta)


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str], *, shard: int | None = None) -> None:
    """Load what :func:`save_optimizer` wrote into ``opt`` (``shard``: this process's part, put
    back into ``DTensor`` shards laid out as the parameters are).

    Raises:
        DataError: the checkpoint was made for other trainable parameters, or lacks this
            process's file.
    """
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["names"] != names:
        raise DataError(folder / "optimizer.json", 0, "the checkpoint was made for other trainable parameters")
    path = folder / _optimizer_file(shard)
    if not path.is_file():
        raise DataError(path, 0, "missing: the checkpoint holds no optimizer state for this process")
    tensors = safetensors.torch.load(path.read_bytes())
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = _as_shard(v, params[int(i)])
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _as_shard(v: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``v`` as a ``DTensor`` laid out as ``param`` when ``param`` is one and ``v`` is a state of
    its shape (AdamW's moments; not its scalar ``step``), else ``v`` (the optimizer moves it to
    the parameter's device and dtype)."""
    local = _local(param)
    if local is param or v.shape != local.shape:
        return v
    from torch.distributed.tensor import DTensor

    d = cast(DTensor, param)
    return DTensor.from_local(v.to(local.device), d.device_mesh, d.placements, run_check=False, shape=d.shape,
                              stride=d.stride())  # fmt: skip
