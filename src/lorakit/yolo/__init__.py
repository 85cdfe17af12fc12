"""Ultralytics YOLO integration: LoRA fine-tuning of YOLO detectors.

Importing this package does not import ultralytics; ``LoraYOLO``,
``LoraDetectionTrainer`` and ``LoraOptions`` load it on first access, so
:func:`offline.enable` can run first::

    from lorakit.yolo import offline, make_dataset
    offline.enable()                        # before anything imports ultralytics
    from lorakit.yolo import LoraYOLO

Modules: ``offline`` (no network), ``data`` (synthetic datasets), ``targets``
(default LoRA targets for detectors), ``trainer`` (the LoRA-aware
``DetectionTrainer``), ``model`` (``LoraYOLO``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import require_extra

# Before anything below: data.py needs cv2, which only ultralytics brings (a one-line error, not a traceback).
require_extra("ultralytics", "yolo", "lorakit.yolo")

from . import offline  # noqa: E402
from .data import make_dataset  # noqa: E402
from .data_tasks import make_task_dataset  # noqa: E402

_LAZY = {
    "LoraYOLO": "model",
    "LoraDetectionTrainer": "trainer",
    "LoraSegmentationTrainer": "tasks",
    "LoraPoseTrainer": "tasks",
    "LoraOBBTrainer": "tasks",
    "LoraClassificationTrainer": "tasks",
    "trainer_for": "tasks",
    "LoraOptions": "trainer",
    "save_adapter": "trainer",
    "detector_config": "targets",
    "compare": "comparison",
    "Comparison": "comparison",
}

__all__ = [
    "Comparison",
    "LoraClassificationTrainer",
    "LoraDetectionTrainer",
    "LoraOBBTrainer",
    "LoraOptions",
    "LoraPoseTrainer",
    "LoraSegmentationTrainer",
    "LoraYOLO",
    "compare",
    "detector_config",
    "make_dataset",
    "make_task_dataset",
    "offline",
    "save_adapter",
    "trainer_for",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
