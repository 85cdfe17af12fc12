"""What ``resume=True`` needs that Ultralytics' ``last.pt`` cannot hold.

``last.pt`` stays a plain merged checkpoint (it loads without lorakit), so it
has neither the unmerged base weights nor the LoRA factors and their EMA. A
LoRA run therefore keeps, in ``weights/lora_resume/``:

* ``base.safetensors``: the model's non-LoRA state as training started (the
  pretrained base, and the initial values of the modules trained fully),
  written once;
* ``epoch{N}.safetensors``: after each saved epoch ``N``, the tensors training
  changes (LoRA factors, fully trained modules with their buffers) of the live
  model (``live/<key>``) and of the EMA (``ema/<key>``), with the run's
  LoraConfig and epoch in the header. The two newest are kept, so a crash
  between this file and ``last.pt`` still leaves the one ``last.pt`` names.

The optimizer state is in ``last.pt`` already (adapter-sized: it holds only the
trainable tensors). Everything here is safetensors (no pickle) and written
atomically. The folder is removed when the run finishes (nothing to resume).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..io_format import atomic_write, encode_owned, safetensors_bytes
from ..owned import train_paths

FOLDER = "lora_resume"
BASE_FILE = "base.safetensors"


@dataclass(frozen=True)
class ResumeState:
    """A LoRA run's state at one saved epoch (read back by :func:`read`)."""

    config: LoraConfig
    adapter_name: str
    adapt_bn: bool
    epoch: int
    base: dict[str, torch.Tensor]
    live: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    loraplus_ratio: float | None = None  # decides the optimizer's groups, so it must be the run's own


def changing_keys(model: nn.Module, config: LoraConfig) -> list[str]:
    """State keys training changes: LoRA factors, trainable parameters, fully trained modules' buffers."""
    trained = tuple(f"{p}." for p in train_paths(model, config.train_modules))
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if ".lora." in k or k in grads or k.startswith(trained)]


def changing_state(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """``model``'s state entries ``keys`` (:func:`changing_keys`): views of its own tensors, which training
    updates in place, so a caller may keep this and read it again each epoch (as long as nothing swaps
    a tensor's storage, ``t.data = ...``, as :func:`lorakit.yolo.layout.to_channels_last` does at setup)."""
    sd = model.state_dict()
    return {k: sd[k] for k in keys}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    written, encoded = encode_owned(tensors)
    atomic_write(path, safetensors_bytes(written, metadata=metadata, encoded=encoded))


def write_base(wdir: Path, model: nn.Module) -> Path:
    """Write the model's non-LoRA state (call right after injection, before any step)."""
    folder = wdir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BASE_FILE
    _write(path, {k: v for k, v in model.state_dict().items() if ".lora." not in k})
    return path


def write_epoch(
    wdir: Path,
    epoch: int,
    live: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor],
    config: LoraConfig,
    adapter_name: str,
    adapt_bn: bool,
    loraplus_ratio: float | None = None,
) -> Path:
    """Write epoch ``epoch``'s changing tensors of the live model and the EMA; keep the two newest files.

    ``live``, ``ema``: the two models' :func:`changing_state` (the same keys).
    """
    tensors = {f"live/{k}": v for k, v in live.items()} | {f"ema/{k}": ema[k] for k in live}
    meta = {
        "epoch": str(epoch),
        "adapter_name": adapter_name,
        "adapt_bn": json.dumps(adapt_bn),
        "loraplus_ratio": json.dumps(loraplus_ratio),
        "config": json.dumps(config.to_dict(), sort_keys=True),
    }
    folder = wdir / FOLDER
    path = folder / f"epoch{epoch}.safetensors"
    _write(path, tensors, meta)
    for old in sorted(folder.glob("epoch*.safetensors"), key=_epoch_of)[:-2]:
        old.unlink(missing_ok=True)
    return path


def _epoch_of(p: Path) -> int:
    digits = p.stem.removeprefix("epoch")
    return int(digits) if digits.isdigit() else -1


def read(last: Path, epoch: int) -> ResumeState:
    """The state saved next to ``last`` (``weights/last.pt``) for ``epoch`` (``last.pt``'s own).

    Raises:
        ConfigError: no LoRA resume state (not a lorakit run, or it finished), or none for
            this epoch; the message names the folder and what it holds.
    """
    folder = Path(last).parent / FOLDER
    base_file, epoch_file = folder / BASE_FILE, folder / f"epoch{epoch}.safetensors"
    if not base_file.is_file():
        raise ConfigError(
            f"cannot resume {last} with LoRA: {base_file} is missing (not a lorakit LoRA run, or the run "
            "finished and its resume state was removed)"
        )
    if not epoch_file.is_file():
        have = sorted(p.name for p in folder.glob("epoch*.safetensors"))
        raise ConfigError(f"cannot resume {last} with LoRA: {epoch_file} is missing (last.pt is epoch {epoch}; {have})")
    base = safetensors.torch.load_file(str(base_file))
    with safetensors.safe_open(str(epoch_file), "pt") as f:
        meta = f.metadata() or {}
    tensors = safetensors.torch.load_file(str(epoch_file))
    try:
        config = LoraConfig.from_dict(json.loads(meta["config"]))
        name, adapt_bn, saved_epoch = meta["adapter_name"], bool(json.loads(meta["adapt_bn"])), int(meta["epoch"])
        ratio = json.loads(meta.get("loraplus_ratio", "null"))
        ratio = None if ratio is None else float(ratio)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot resume {last}: {epoch_file} has a malformed header ({exc!r})") from None
    if saved_epoch != epoch:
        raise ConfigError(f"cannot resume {last}: {epoch_file} says epoch {saved_epoch}, last.pt {epoch}")
    live = {k.removeprefix("live/"): v for k, v in tensors.items() if k.startswith("live/")}
    ema = {k.removeprefix("ema/"): v for k, v in tensors.items() if k.startswith("ema/")}
    return ResumeState(config, name, adapt_bn, epoch, base, live, ema, ratio)


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into ``model``'s state (strict: every key must exist with its shape)."""
    sd = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in sd or sd[k].shape != v.shape]
    if bad:
        raise ConfigError(f"cannot resume: {where} does not fit the model at {bad[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            sd[k].copy_(v)


def remove(wdir: Path) -> None:
    """Drop the resume state (the run finished: Ultralytics refuses to resume it)."""
    shutil.rmtree(wdir / FOLDER, ignore_errors=True)
