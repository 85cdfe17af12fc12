"""What the demo and ``lorakit yolo compare`` measure inside an Ultralytics run, in one home.

Trainable parameters (counted from the optimizer, so exactly what learns) and the
time of each epoch; peak memory and bytes on disk are :mod:`lorakit.compare.measure`'s.
Nothing here imports ultralytics at module level (:mod:`lorakit.yolo.offline` must run first).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def open_yolo(path: str | Path) -> Any:
    """``ultralytics.YOLO(path)``, typed as ``Any`` (ultralytics ships no type hints)."""
    from ultralytics import YOLO  # type: ignore[attr-defined]

    return YOLO(str(path))


class EpochMeter:
    """Ultralytics callbacks: the time of each training epoch and the number of optimised parameters."""

    def __init__(self, model: Any) -> None:
        self.epoch_s: list[float] = []
        self.trainable = 0
        self._t0 = 0.0
        model.add_callback("on_pretrain_routine_end", self._count)
        model.add_callback("on_train_epoch_start", self._start)
        model.add_callback("on_train_epoch_end", self._end)

    def _count(self, trainer: Any) -> None:
        # Each tensor once (ids), and only those that learn: Ultralytics' groups may hold frozen ones.
        params = {id(p): p for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad}
        self.trainable = sum(p.numel() for p in params.values())

    def _start(self, trainer: Any) -> None:
        self._t0 = time.perf_counter()

    def _end(self, trainer: Any) -> None:
        self.epoch_s.append(time.perf_counter() - self._t0)

    def epoch_seconds(self) -> float:
        """Mean epoch time, leaving out the first epoch (caching and warm-up) when there are more."""
        t = self.epoch_s[1:] or self.epoch_s
        return sum(t) / len(t) if t else 0.0
