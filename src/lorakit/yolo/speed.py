"""What lorakit's YOLO trainers do for speed that is not LoRA: :class:`SpeedMixin`.

Two things, each measured on yolo26n at imgsz 160 (batch 16, 64 images, one thread, a 2-core
AMD EPYC; ``bench/yolo_train_profile.py``):

* **Channels-last on an x86 CPU** (:mod:`.layout`): a training step took 0.69-0.79x the time.
* **The setup's heap frozen for the garbage collector.** After setup a yolo26n LoRA run holds
  about 410,000 objects the collector tracks (modules of torch, Ultralytics and their imports,
  the model, the data set). Each full (oldest-generation) collection walks all of them:
  0.17-0.2 s, in the middle of an epoch, every two or three epochs of a 2 s epoch, and LoRA's
  per-epoch bookkeeping (state dicts, adapter files) allocates enough to trigger them more
  often than full fine-tuning does. ``gc.freeze()`` at the end of setup moves those objects to
  a generation the collector never walks, so later collections look only at what training
  allocates; ``gc.unfreeze()`` when training ends gives them back (nothing that was garbage at
  setup stays uncollected after the run). Only if nothing else froze objects first: the
  freeze is the process's, and someone else's is left alone.

``lorakit yolo compare`` trains its full, partial and head-only strategies with the same
mixin (:func:`with_speedups`), so its times differ by strategy, not by trainer.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from .layout import to_channels_last, usual_layout, wanted


class SpeedMixin:
    """In front of an Ultralytics trainer class (``class T(SpeedMixin, DetectionTrainer)``).

    The model trains channels-last where :func:`.layout.wanted` says so (Ultralytics' own
    ``channels_last`` setting decides, None meaning auto); ``last.pt``/``best.pt`` are written in
    the usual layout; the heap built during setup is frozen for the garbage collector until
    training ends.
    """

    args: Any
    device: torch.device
    ema: Any
    _froze_heap = False
    _decided: bool | None = None  # channels-last or not, decided when setup starts

    def channels_last(self) -> bool:
        """Whether this run trains channels-last (the run's ``channels_last``, :func:`.layout.wanted`)."""
        if self._decided is not None:
            return self._decided
        return wanted(getattr(self.args, "channels_last", None), self.device)

    def get_model(self, *args: Any, **kwargs: Any) -> nn.Module:
        model: nn.Module = super().get_model(*args, **kwargs)  # type: ignore[misc]
        return to_channels_last(model) if self.channels_last() else model

    def save_model(self) -> Any:
        with usual_layout(self.ema.ema):
            return super().save_model()  # type: ignore[misc]

    def _setup_train(self) -> None:
        self._decided = self.channels_last()
        # channels_last=True off CUDA: Ultralytics would log that it ignores it, but get_model applies it
        setting = getattr(self.args, "channels_last", None)
        hush = setting is True and self.device.type != "cuda"
        if hush:
            self.args.channels_last = None
        try:
            super()._setup_train()  # type: ignore[misc]
        finally:
            if hush:
                self.args.channels_last = setting
        if gc.get_freeze_count() == 0:  # nobody else froze objects (a freeze is the whole process's)
            gc.freeze()
            self._froze_heap = True

    def _do_train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._do_train(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._froze_heap:
                gc.unfreeze()
                self._froze_heap = False


def with_speedups(trainer: type) -> type:
    """``trainer`` (an Ultralytics trainer class) with :class:`SpeedMixin` in front, for
    ``YOLO(...).train(trainer=...)``."""
    return type(f"Fast{trainer.__name__}", (SpeedMixin, trainer), {})
