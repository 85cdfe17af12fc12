"""``lorakit serve yolo``: detections from one base detector with an adapter chosen per request.

Each cached adapter is a merged, fused copy of the base (the adapter folded in by
:meth:`LoraYOLO.merged_model <lorakit.yolo.LoraYOLO.merged_model>`, Conv+BN fused by Ultralytics'
predictor) with its own Ultralytics ``YOLO`` object and predictor: a request on a cached adapter
runs exactly plain Ultralytics ``predict`` on it, with no switch and no merge. Each copy has its
own lock (an Ultralytics predictor is not re-entrant), so requests for different adapters run at
the same time and only requests for the same adapter take turns. A miss loads the adapter onto
one shared :class:`~lorakit.yolo.LoraYOLO` builder under its own lock, merges a copy and removes the
adapter again; that costs a load and a merge (about a second for yolo26n on CPU) once per version.

POST ``/v1/detect`` with JSON ``{"adapter": NAME, "images": [base64, ...], "conf": 0.25, "iou": 0.7,
"max_det": 300}`` answers ``{"adapter", "adapter_version", "names": {id: name}, "results": [{"boxes":
[[x1, y1, x2, y2], ...], "classes": [...], "scores": [...], "labels": [...]}, ...]}`` (one result per
image, boxes in the image's pixels).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .app import Answer, Server
from .errors import BadRequestError
from .images import decode_images
from .store import AdapterStore


@dataclass(eq=False)
class Detector:
    """One adapter's merged model behind its own Ultralytics ``YOLO`` object; ``lock`` serialises its predictor."""

    yolo: Any
    names: dict[int, str]
    lock: threading.Lock


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _number(payload: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequestError(f"{key!r}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


class YoloService:
    """The detector server's model side: the store's loader and the ``/v1/detect`` handler.

    Call ``lorakit.yolo.offline.enable()`` before constructing it (it imports Ultralytics).

    Args:
        model: the base checkpoint (``.pt``) or Ultralytics ``.yaml``.
        adapters: the store folder. budget_bytes, pinned: as :class:`AdapterStore`.
        imgsz: the inference size (fixed per server: each predictor is set up and warmed once for it).
        device: Ultralytics' ``device`` for predict (``cpu``, ``0``, ...).
        max_images, max_pixels: request limits (413 beyond them).

    Raises:
        ConfigError: a bad store folder or budget; the errors of ``LoraYOLO(model)``.
    """

    def __init__(
        self,
        model: str | Path,
        adapters: str | Path,
        *,
        budget_bytes: int,
        pinned: tuple[str, ...] = (),
        imgsz: int = 640,
        device: str | None = None,
        max_images: int = 16,
        max_pixels: int = 4096 * 4096,
    ) -> None:
        from ..yolo import LoraYOLO

        self.model_path = str(model)
        self.builder = LoraYOLO(self.model_path)
        self.builder_lock = threading.Lock()
        self.imgsz = imgsz
        self.device = device
        self.max_images = max_images
        self.max_pixels = max_pixels
        self._ids = itertools.count()
        self.store: AdapterStore[Detector] = AdapterStore(adapters, self.load, budget_bytes=budget_bytes, pinned=pinned)

    def _predict_args(self) -> dict[str, Any]:
        extra = {"device": self.device} if self.device is not None else {}
        return {"imgsz": self.imgsz, "verbose": False, "save": False, **extra}

    def load(self, name: str, folder: Path) -> tuple[Detector, int]:
        """The store's loader: a merged copy of base + adapter behind its own, warmed-up predictor."""
        import numpy as np
        from ultralytics import YOLO  # type: ignore[attr-defined]

        with self.builder_lock:  # the builder holds one adapter at a time
            tmp = f"serve-{next(self._ids)}"
            self.builder.load_adapter(folder, name=tmp)
            try:
                merged = self.builder.merged_model()
            finally:
                self.builder.delete_adapter(tmp)  # drops the builder's reference to the merged copy too
        merged.eval()
        yolo = YOLO(self.model_path)
        yolo.model = merged
        yolo.predictor = None
        # the first predict sets up the predictor and fuses Conv+BN: pay it here, not in a request
        yolo.predict(np.zeros((self.imgsz, self.imgsz, 3), dtype=np.uint8), **self._predict_args())
        names = {int(k): str(v) for k, v in dict(getattr(merged, "names", {}) or {}).items()}
        return Detector(yolo, names, threading.Lock()), model_bytes(merged)

    def detect(self, payload: dict[str, Any]) -> Answer:
        """The ``/v1/detect`` handler (module docstring).

        Raises:
            BadRequestError: a missing adapter name, bad numbers or images. The store's errors.
        """
        name = payload.get("adapter", payload.get("model"))
        if not isinstance(name, str):
            raise BadRequestError(f'expected "adapter": the adapter name (one of {self.store.names()}), got {name!r}')
        conf = _number(payload, "conf", 0.25, 0.0, 1.0)
        iou = _number(payload, "iou", 0.7, 0.0, 1.0)
        max_det = int(_number(payload, "max_det", 300, 1, 10_000))
        images = decode_images(payload, max_images=self.max_images, max_pixels=self.max_pixels)
        with self.store.use(name) as entry:
            det = entry.value
            with det.lock:
                results = det.yolo.predict(images, conf=conf, iou=iou, max_det=max_det, **self._predict_args())
        out = []
        for r in results:
            boxes = r.boxes
            classes = [int(c) for c in boxes.cls.tolist()]
            out.append(
                {
                    "boxes": boxes.xyxy.tolist(),
                    "classes": classes,
                    "scores": boxes.conf.tolist(),
                    "labels": [det.names.get(c, str(c)) for c in classes],
                }
            )
        body = {"adapter": entry.name, "adapter_version": entry.version, "names": det.names, "results": out}
        return body, entry.name, entry.version


def yolo_server(service: YoloService, *, max_body: int) -> Server:
    """The HTTP server of a :class:`YoloService`: ``/v1/detect`` plus ``/health``, ``/metrics``, ``/v1/adapters``."""
    server = Server(service.store, title="lorakit serve yolo", max_body=max_body)
    server.json_endpoint("/v1/detect", service.detect)
    return server
