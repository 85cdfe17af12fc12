"""``lorakit hf train`` checkpoints: finding the newest, the optimizer's files, the NaN stop error."""

from __future__ import annotations

import json
from pathlib import Path

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


def save_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    """``optimizer.safetensors`` (the state tensors) and ``optimizer.json`` (the parameter groups
    and the trainable parameters' names, in the optimizer's order), written atomically."""
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    atomic_write(folder / "optimizer.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "optimizer.json", json.dumps({"param_groups": groups, "names": names}, indent=1).encode())


def load_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    """Load what :func:`save_optimizer` wrote into ``opt``.

    Raises:
        DataError: the checkpoint was made for other trainable parameters.
    """
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["names"] != names:
        raise DataError(folder / "optimizer.json", 0, "the checkpoint was made for other trainable parameters")
    tensors = safetensors.torch.load(Path(folder / "optimizer.safetensors").read_bytes())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
