"""``LoraYOLO``: ``ultralytics.YOLO`` that fine-tunes with a LoRA adapter.

::

    from lorakit.yolo import LoraYOLO
    model = LoraYOLO("yolo26n.pt", r=8)                 # or a .yaml; LoRA options as keywords
    model.train(data="data.yaml", epochs=20, imgsz=640) # every YOLO.train argument works
    model.save_adapter("my_adapter")                    # the adapter alone (best epoch)
    model.val(); model.predict("img.jpg")               # the merged model, as plain YOLO
    model.export(format="onnx")                         # merged, zero LoRA overhead

After ``train`` the object holds the merged ``best.pt`` exactly as ``YOLO``
would; that file loads in plain Ultralytics without lorakit. Only detection
is supported in this version.
"""

from __future__ import annotations

import shutil
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics import YOLO  # type: ignore[attr-defined]

from ..adapters import merge_and_unload
from ..config import LoraConfig
from ..layers import LoraLayer
from .trainer import LoraDetectionTrainer, LoraOptions


class LoraYOLO(YOLO):  # type: ignore[misc]
    """``ultralytics.YOLO`` whose ``train`` trains a LoRA adapter (see :class:`LoraOptions`).

    Args:
        model: a ``.pt`` checkpoint or ``.yaml`` config, as for ``YOLO``.
        r, alpha, dropout, exclude, config, adapt_bn, adapter_name, max_fraction:
            the LoRA settings, see :class:`~lorakit.yolo.trainer.LoraOptions`.
        task, verbose: as for ``YOLO``.

    Raises:
        ConfigError: invalid LoRA settings.
        NotImplementedError: a model that is not a plain YOLO detector (World, YOLOE, RT-DETR).
    """

    def __init__(
        self,
        model: str | Path = "yolo26n.pt",
        *,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        exclude: tuple[str, ...] | list[str] = (),
        config: LoraConfig | None = None,
        adapt_bn: bool = True,
        adapter_name: str = "default",
        max_fraction: float = 1.0,
        task: str | None = None,
        verbose: bool = False,
    ) -> None:
        lora = LoraOptions(
            r=r,
            alpha=alpha,
            dropout=dropout,
            exclude=tuple(exclude),
            config=config,
            adapt_bn=adapt_bn,
            adapter_name=adapter_name,
            max_fraction=max_fraction,
        )
        super().__init__(model, task=task, verbose=verbose)
        if not isinstance(self, LoraYOLO):  # YOLO.__init__ switched the class (World/YOLOE/RT-DETR)
            raise NotImplementedError(f"LoraYOLO supports YOLO detectors only, got {type(self).__name__}")
        self.lora = lora

    def train(self, trainer: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Train a LoRA adapter; arguments as ``YOLO.train``. Returns the metrics.

        ``optimizer="auto"`` (the default) means AdamW with lr 0.007 (LoRA wants
        about 7x the learning rate of full fine-tuning); MuSGD and
        ``resume`` are refused. ``trainer`` may name a subclass of
        :class:`LoraDetectionTrainer`.
        """
        if self.task != "detect":
            raise NotImplementedError(f"LoraYOLO.train supports task='detect' only, got {self.task!r}")
        if kwargs.get("resume"):
            raise NotImplementedError(
                "resume is not supported with LoRA (checkpoints hold merged weights); start a new run from last.pt"
            )
        cls = trainer or LoraDetectionTrainer
        if not (isinstance(cls, type) and issubclass(cls, LoraDetectionTrainer)):
            raise TypeError(f"LoraYOLO.train: trainer must subclass LoraDetectionTrainer, got {cls!r}")
        return super().train(trainer=partial(cls, lora=self.lora), **kwargs)

    @property
    def adapter_dir(self) -> Path | None:
        """The adapter folder of the last run (best epoch if one was saved), or ``None`` before training."""
        t = self.trainer
        if not isinstance(t, LoraDetectionTrainer):
            return None
        for p in (t.best_adapter, t.last_adapter):
            if p.exists():
                return Path(p)
        return None

    def save_adapter(self, path: str | Path) -> Path:
        """Copy the trained adapter folder (best epoch) to ``path``; return ``path``.

        Raises:
            RuntimeError: nothing has been trained yet.
        """
        src = self.adapter_dir
        if src is None:
            raise RuntimeError("LoraYOLO.save_adapter: no adapter yet; call train() first")
        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(src, path)
        return path

    def export(self, **kwargs: Any) -> Any:
        """``YOLO.export`` on the merged model (a LoRA model is merged on a copy first)."""
        model = self.model
        if isinstance(model, nn.Module) and any(isinstance(m, LoraLayer) for m in model.modules()):
            self.model = merge_and_unload(deepcopy(model))
            try:
                return super().export(**kwargs)
            finally:
                self.model = model
        return super().export(**kwargs)
