"""Synthetic detection data in YOLO format: shapes on textured backgrounds.

Two "domains" differ in everything a fine-tune has to adapt to::

    domain  classes                          background                    shapes
    A       rectangle, circle                dark grey, noise + blotches   bright, warm colours
    B       triangle, ellipse, cross         light stripes or checkers     dark, cool colours

:func:`make_dataset` writes ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt``
(``class cx cy w h``, normalised) and ``data.yaml`` into a folder. The same
arguments give the same bytes (numpy ``default_rng`` seeded by ``seed``, split
and domain). Boxes are the exact bounding boxes of the drawn pixels, and shapes
do not overlap, so no box is hidden. 64 images of 160 px take well under a second.

Ultralytics writes ``labels/*.cache`` next to the labels, so use a folder you own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

_Image = np.ndarray
_Rng = np.random.Generator
Label = tuple[int, float, float, float, float]  # class, cx, cy, w, h (normalised)

DOMAINS: dict[str, tuple[str, ...]] = {
    "A": ("rectangle", "circle"),
    "B": ("triangle", "ellipse", "cross"),
}


def _background_a(rng: _Rng, size: int) -> _Image:
    # Dark uniform grey, low-frequency blotches, fine noise.
    level = rng.uniform(0, 60)
    blotch = cv2.resize(rng.uniform(-20, 20, (5, 5, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 8, (size, size, 3))
    return np.clip(level + blotch + noise, 0, 255).astype(np.uint8)


def _background_b(rng: _Rng, size: int) -> _Image:
    # Light stripes (random angle and period) or a checkerboard, in two light tints.
    c1, c2 = rng.uniform(150, 255, 3), rng.uniform(150, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 20) * size / 160
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    else:
        t = ((xx // period + yy // period) % 2).astype(np.float32)
    img = c1 * t[..., None] + c2 * (1 - t[..., None]) + rng.normal(0, 4, (size, size, 3))
    out: _Image = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _colour(rng: _Rng, domain: str) -> tuple[int, int, int]:
    # BGR. A: bright reds/oranges/yellows; B: dark blues/greens/purples.
    if domain == "A":
        return int(rng.uniform(0, 90)), int(rng.uniform(120, 255)), int(rng.uniform(200, 255))
    return int(rng.uniform(90, 200)), int(rng.uniform(0, 110)), int(rng.uniform(0, 90))


def _draw(mask: _Image, shape: str, cx: int, cy: int, s: int, rng: _Rng) -> None:
    """Draw ``shape`` (size about ``s`` px, centred at cx, cy) as 255 on ``mask``."""
    h = s // 2
    if shape == "rectangle":
        w2, h2 = h, max(2, int(h * rng.uniform(0.5, 1.0)))
        if rng.random() < 0.5:
            w2, h2 = h2, w2
        cv2.rectangle(mask, (cx - w2, cy - h2), (cx + w2, cy + h2), 255, -1)
    elif shape == "circle":
        cv2.circle(mask, (cx, cy), h, 255, -1)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * np.pi)
        pts = [(cx + h * np.cos(a + k * 2 * np.pi / 3), cy + h * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)]
        cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 255)
    elif shape == "ellipse":
        axes = (h, max(2, int(h * rng.uniform(0.35, 0.6))))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    elif shape == "cross":
        t = max(2, s // 6)
        cv2.rectangle(mask, (cx - h, cy - t), (cx + h, cy + t), 255, -1)
        cv2.rectangle(mask, (cx - t, cy - h), (cx + t, cy + h), 255, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_image(rng: _Rng, domain: str, size: int, max_objects: int = 4) -> tuple[_Image, list[Label]]:
    """One ``size x size`` BGR image and its YOLO labels ``(cls, cx, cy, w, h)`` (normalised)."""
    classes = DOMAINS[domain]
    background: Callable[[_Rng, int], _Image] = _background_a if domain == "A" else _background_b
    img = background(rng, size)
    taken = np.zeros((size, size), bool)
    labels: list[Label] = []
    lo, hi = max(8, 16 * size // 160), max(12, 60 * size // 160)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            cls = int(rng.integers(len(classes)))
            s = int(rng.integers(lo, hi + 1))
            cx, cy = (int(v) for v in rng.integers(s // 2 + 1, size - s // 2 - 1, 2))
            mask = np.zeros((size, size), np.uint8)
            _draw(mask, classes[cls], cx, cy, s, rng)
            grown = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0  # keep a gap between shapes
            if (grown & taken).any() or not mask.any():
                continue
            taken |= grown
            img[mask > 0] = _colour(rng, domain)
            x, y, w, h = cv2.boundingRect(mask)
            labels.append((cls, (x + w / 2) / size, (y + h / 2) / size, w / size, h / size))
            break
    return img, labels


def make_dataset(
    root: str | os.PathLike[str],
    *,
    domain: str = "A",
    n_train: int = 64,
    n_val: int = 16,
    imgsz: int = 160,
    seed: int = 0,
    max_objects: int = 4,
) -> Path:
    """Write a synthetic YOLO detection dataset into ``root``; return its ``data.yaml``.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        domain: ``"A"`` or ``"B"`` (see the module docstring).
        n_train, n_val: number of images per split (>= 1).
        imgsz: image side in pixels (square images), >= 32.
        seed: the same seed (and other arguments) gives identical files.
        max_objects: each image has 1 to ``max_objects`` shapes.

    Raises:
        ValueError: unknown domain or out-of-range counts/sizes.
    """
    if domain not in DOMAINS:
        raise ValueError(f"make_dataset: domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if n_train < 1 or n_val < 1 or imgsz < 32 or max_objects < 1:
        raise ValueError(
            f"make_dataset: need n_train, n_val, max_objects >= 1 and imgsz >= 32, got "
            f"n_train={n_train}, n_val={n_val}, imgsz={imgsz}, max_objects={max_objects}"
        )
    root = Path(root).resolve()
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, split_index, sorted(DOMAINS).index(domain)])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = make_image(rng, domain, imgsz, max_objects)
            stem = f"{domain}_{split}_{i:05d}"
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), img)
            lines = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
            (root / "labels" / split / f"{stem}.txt").write_text(lines)
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(DOMAINS[domain]))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml
