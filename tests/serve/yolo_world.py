"""A random-weight yolo26n base, adapters for it with their own class names, and tiny PNG images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch

import lorakit

IMGSZ = 64


def make_detector_adapter(base_pt: Path, folder: Path, seed: int, names: dict[int, str]) -> Path:
    """An adapter as a LoRA run writes it (LoRA on the convs, BatchNorm and class convs trained fully),
    with random values (a trained B is not zero) and the class names ``names`` in its header."""
    from ultralytics import YOLO

    from lorakit.yolo.targets import class_convs
    from lorakit.yolo.trainer import LoraOptions, save_adapter

    model = YOLO(str(base_pt)).model.float()
    heads = class_convs(model)
    lorakit.inject(model, LoraOptions(r=4).build(model, heads))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B and the fully trained class convs (the adapter's own copies) move
        for t in [p for n, p in model.named_parameters() if n.endswith(".B")]:
            t.add_(torch.randn(t.shape, generator=gen) * 0.3)
        for path in heads:
            for t in model.get_submodule(path).parameters():
                t.add_(torch.randn(t.shape, generator=gen) * 2.0)
    model.names = names
    return save_adapter(model, folder, task="detect")


def png_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMGSZ, IMGSZ, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def offline_answers(
    base_pt: Path, folder: Path, images: list[bytes], conf: float, max_det: int
) -> list[dict[str, list]]:
    """What ``LoraYOLO(base, adapter=folder).predict`` gives for each image, in the server's JSON shape."""
    from PIL import Image

    from lorakit.yolo import LoraYOLO

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    results = LoraYOLO(str(base_pt), adapter=folder).predict(
        pil, imgsz=IMGSZ, conf=conf, max_det=max_det, verbose=False
    )
    return [
        {
            "boxes": r.boxes.xyxy.tolist(),
            "classes": [int(c) for c in r.boxes.cls.tolist()],
            "scores": r.boxes.conf.tolist(),
        }
        for r in results
    ]
