"""What an ``hf train`` checkpoint records about its run (``run.json``), and the check made on ``resume=True``.

A resumed run must be the run that was saved: its adapter was built from ``r``,
``alpha``, ``dropout``, ``targets`` and ``dora`` (the variant), its examples, their order
and their split come from ``model`` (tokenizer), ``data``, ``eval``, ``eval_fraction``,
``task``, ``seed``, ``batch_size``, ``grad_accum``, the number of processes and
``max_len``, and its optimizer state from ``weight_decay``,
``loraplus_ratio`` (which also decides the optimizer's parameter groups) and ``fsdp``
(sharded, the state is saved as one shard per process). A change
to any of these (:data:`FIXED`) is a :class:`ResumeMismatchError` naming each changed key
with its saved and new value. Files are compared by content (sha256), not by path: the
same file moved is the same run; the same path rewritten is not. ``lr``, ``epochs``,
``max_steps``, ``warmup`` and ``schedule`` (:data:`ADJUSTABLE`) may change: the new value
applies from the next step, and a :class:`~lorakit.hf.options.TrainWarning` says so. The
other options (``out``, ``eval_every``, ``save_every``, ``stop_after``, ``progress``,
``gradient_checkpointing``, ``device``, ``precision``, ``report_to``) do not change what is
trained (``precision`` changes its rounding) and are not recorded.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io_format import parse_json
from .options import TrainOptions, TrainWarning

RUN_FILE = "run.json"
FIXED = ("model", "data", "eval", "eval_fraction", "task", "r", "alpha", "dropout", "targets", "dora", "seed",
         "batch_size", "grad_accum", "processes", "fsdp", "max_len", "weight_decay", "loraplus_ratio",
         "quantize")  # fmt: skip
ADJUSTABLE = ("lr", "epochs", "max_steps", "warmup", "schedule")
# The files of a model folder that decide its architecture and its tokens (weights are
# too large to hash on every start; load_adapter's base-weight fingerprint covers them).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja")  # fmt: skip


class ResumeMismatchError(ConfigError):
    """``resume=True`` with settings that differ from the saved run's. ``changes`` maps each
    changed key to ``(saved, new)``."""

    def __init__(self, checkpoint: Path, changes: dict[str, tuple[Any, Any]]) -> None:
        self.checkpoint = checkpoint
        self.changes = changes
        listed = "; ".join(f"{k}: saved {_show(a)}, now {_show(b)}" for k, (a, b) in changes.items())
        super().__init__(
            f"hf train: resume=True, but {len(changes)} setting(s) differ from the run saved in {checkpoint}: "
            f"{listed}. Resume with the saved values, or start a new run in another out"
        )


def _show(v: Any) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v['path']!r} (sha256 {v['sha256'][:12]})"
    return repr(v)


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # hashlib.file_digest needs Python 3.11
            h.update(chunk)
    return h.digest()


def _file(path: str) -> dict[str, str]:
    """The file's path and the sha256 of its content (compared; the path is shown)."""
    return {"path": path, "sha256": _sha256(Path(path)).hex()}


def _model(path: str) -> dict[str, str]:
    """The folder's path and one sha256 of its :data:`MODEL_FILES` (names and contents)."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        if (Path(path) / name).is_file():
            h.update(name.encode() + b"\0" + _sha256(Path(path) / name))
    return {"path": path, "sha256": h.hexdigest()}


def run_record(o: TrainOptions, task: str, processes: int = 1) -> dict[str, Any]:
    """The record of the run ``o`` (after ``max_len`` was fitted to the model) with the resolved ``task``
    and the number of ``processes`` (DDP: the batches are split among them).

    Raises:
        OSError: a file cannot be read (they were all read just before).
    """
    return {
        "model": _model(o.model),
        "data": _file(o.data),
        "eval": None if o.eval is None else _file(o.eval),
        "eval_fraction": o.eval_fraction,
        "task": task,
        "r": o.r,
        "alpha": o.lora_alpha,
        "dropout": o.dropout,
        "targets": [o.targets] if isinstance(o.targets, str) else o.targets,
        "dora": o.dora,
        "quantize": o.quantize,
        "seed": o.seed,
        "batch_size": o.batch_size,
        "grad_accum": o.grad_accum,
        "processes": processes,
        "fsdp": o.fsdp,
        "max_len": o.max_len,
        "weight_decay": o.weight_decay,
        "loraplus_ratio": o.loraplus_ratio,
        "lr": o.lr,
        "epochs": o.epochs,
        "max_steps": o.max_steps,
        "warmup": o.warmup,
        "schedule": o.schedule,
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return bool(a.get("sha256") == b.get("sha256"))
    return bool(a == b)


def check_resume(checkpoint: Path, new: dict[str, Any]) -> None:
    """Compare ``new`` with the record saved in ``checkpoint`` (module docstring).

    A checkpoint without a record (written before lorakit kept one) cannot be checked: a
    TrainWarning says so.

    Raises:
        ResumeMismatchError: a :data:`FIXED` setting differs (all differing ones are named).
    """
    path = checkpoint / RUN_FILE
    if not path.is_file():
        warnings.warn(f"{checkpoint} has no {RUN_FILE}; the resumed settings cannot be checked", TrainWarning,
                      stacklevel=3)  # fmt: skip
        return
    saved = parse_json(path, path.read_bytes())
    # A key missing from the saved record comes from an older lorakit: nothing to compare.
    changes = {k: (saved[k], new[k]) for k in FIXED if k in saved and not _same(saved[k], new[k])}
    if changes:
        raise ResumeMismatchError(checkpoint, changes)
    for k in ADJUSTABLE:
        if k in saved and saved[k] != new[k]:
            warnings.warn(f"resume: {k} changed from {saved[k]!r} to {new[k]!r}; the new value applies from here on",
                          TrainWarning, stacklevel=3)  # fmt: skip
