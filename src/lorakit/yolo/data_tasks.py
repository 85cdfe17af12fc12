"""Synthetic datasets for the other YOLO tasks: segment, pose, OBB and classify.

The same two domains as :mod:`lorakit.yolo.data` (same classes, backgrounds,
colours and shape drawing, imported from there), but every shape is also
rotated by a random angle, so oriented boxes differ from upright ones. Labels
are read off each shape's own pixel mask, so they are exact:

========  ==========================================  =====================================
task      layout                                      label line (coordinates normalised)
========  ==========================================  =====================================
segment   ``images/{split}``, ``labels/{split}``      ``cls x1 y1 x2 y2 ...`` outer contour
pose      same, ``kpt_shape: [5, 3]`` in data.yaml    ``cls cx cy w h`` + 5 x ``x y 2``
obb       same                                        ``cls x1 y1 ... x4 y4`` min-area box
classify  ``{split}/{class name}/*.png``              (the folder); one shape per image
========  ==========================================  =====================================

The pose keypoints are the shape's centre (mean pixel) and its top-, bottom-,
left- and right-most pixels, so a horizontal flip swaps only left and right
(``flip_idx: [0, 1, 2, 4, 3]``). Same arguments, same bytes: the generator is
numpy's ``default_rng`` seeded by ``seed``, split, domain and task.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .data import DOMAINS, _background_a, _background_b, _colour, _draw

TASKS = ("segment", "pose", "obb", "classify")
KPT_SHAPE = (5, 3)  # centre, top, bottom, left, right; (x, y, visibility)
FLIP_IDX = (0, 1, 2, 4, 3)

_Image = np.ndarray
_Rng = np.random.Generator


_Shapes = list[tuple[int, _Image]]  # (class, uint8 mask of that shape)


def _shapes(rng: _Rng, domain: str, size: int, count: int, cls: int | None = None) -> tuple[_Image, _Shapes]:
    """A background with ``count`` (or fewer, if no room) rotated, non-touching shapes: ``(image, [(class, mask)])``.

    ``cls`` fixes every shape's class (classification); else each is drawn at random.
    """
    classes = DOMAINS[domain]
    img: _Image = (_background_a if domain == "A" else _background_b)(rng, size)
    taken = np.zeros((size, size), bool)
    out: _Shapes = []
    lo, hi = max(8, 16 * size // 160), max(12, 60 * size // 160)
    for _ in range(count):
        for _try in range(20):
            c = int(rng.integers(len(classes))) if cls is None else cls
            s = int(rng.integers(lo, hi + 1))
            room = int(np.ceil(0.71 * s)) + 1  # half-diagonal of the shape's square: any rotation stays inside
            cx, cy = (int(v) for v in rng.integers(room, size - room, 2))
            upright = np.zeros((size, size), np.uint8)
            _draw(upright, classes[c], cx, cy, s, rng)
            turn = cv2.getRotationMatrix2D((float(cx), float(cy)), float(rng.uniform(0, 180)), 1.0)
            mask = cv2.warpAffine(upright, turn, (size, size), flags=cv2.INTER_NEAREST)
            grown = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0  # keep a gap between shapes
            if (grown & taken).any() or int(mask.astype(bool).sum()) < 9:
                continue
            taken |= grown
            img[mask > 0] = _colour(rng, domain)
            out.append((c, mask))
            break
    return img, out


def _xy(x: float, y: float, size: int) -> str:
    # pixel (x, y) -> its centre, normalised
    return f"{(x + 0.5) / size:.6f} {(y + 0.5) / size:.6f}"


def segment_label(cls: int, mask: _Image) -> str:
    """``cls x1 y1 ...``: the outer contour of the mask's largest blob through pixel centres."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    poly = max(contours, key=cv2.contourArea).reshape(-1, 2)
    size = mask.shape[0]
    return " ".join([str(cls), *(_xy(float(x), float(y), size) for x, y in poly)])


def keypoints(mask: _Image) -> list[tuple[float, float]]:
    """Pixel coordinates of centre, top-, bottom-, left- and right-most pixel (ties: the middle one)."""
    ys, xs = np.nonzero(mask)

    def extreme(primary: np.ndarray, other: np.ndarray, pick_max: bool, swap: bool) -> tuple[float, float]:
        v = primary.max() if pick_max else primary.min()
        rest = np.sort(other[primary == v])
        mid = float(rest[len(rest) // 2])
        return (mid, float(v)) if not swap else (float(v), mid)

    return [
        (float(xs.mean()), float(ys.mean())),
        extreme(ys, xs, False, False),  # top: min y
        extreme(ys, xs, True, False),  # bottom: max y
        extreme(xs, ys, False, True),  # left: min x
        extreme(xs, ys, True, True),  # right: max x
    ]


def pose_label(cls: int, mask: _Image) -> str:
    """``cls cx cy w h`` (the pixels' bounding box) and the 5 :func:`keypoints`, each visible (``x y 2``)."""
    size = mask.shape[0]
    x, y, w, h = cv2.boundingRect(mask)
    box = f"{(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}"
    kpts = " ".join(f"{_xy(kx, ky, size)} 2" for kx, ky in keypoints(mask))
    return f"{cls} {box} {kpts}"


def obb_label(cls: int, mask: _Image) -> str:
    """``cls x1 y1 ... x4 y4``: the minimum-area rotated rectangle around the pixels (their whole squares)."""
    size = mask.shape[0]
    (cx, cy), (w, h), angle = cv2.minAreaRect(cv2.findNonZero(mask))
    corners = cv2.boxPoints(((cx + 0.5, cy + 0.5), (w + 1, h + 1), angle))
    corners = np.clip(corners, 0, size) / size
    return " ".join([str(cls), *(f"{x:.6f} {y:.6f}" for x, y in corners)])


_LABELS = {"segment": segment_label, "pose": pose_label, "obb": obb_label}


def make_task_dataset(
    root: str | os.PathLike[str],
    *,
    task: str,
    domain: str = "A",
    n_train: int = 16,
    n_val: int = 8,
    imgsz: int = 64,
    seed: int = 0,
    max_objects: int = 3,
) -> Path:
    """Write a synthetic Ultralytics dataset for ``task`` into ``root``; return what ``data=`` takes.

    Args:
        root: output folder (created; files of the same names are overwritten).
        task: ``"segment"``, ``"pose"``, ``"obb"`` or ``"classify"`` (layouts in the module docstring).
        domain: ``"A"`` (2 classes) or ``"B"`` (3 classes), as in :mod:`lorakit.yolo.data`.
        n_train, n_val: images per split; classify needs at least one per class
            (image ``i`` shows class ``i % classes``, so every class is in every split).
        imgsz: image side in pixels (square), >= 32.
        seed: the same seed (and other arguments) gives identical files.
        max_objects: 1 to ``max_objects`` shapes per image (classify: always one).

    Returns:
        ``root/data.yaml``, or ``root`` itself for classify (Ultralytics takes the folder there).

    Raises:
        ValueError: unknown task or domain, or out-of-range counts/sizes.
    """
    if task not in TASKS:
        raise ValueError(f"make_task_dataset: task must be one of {TASKS}, got {task!r}")
    if domain not in DOMAINS:
        raise ValueError(f"make_task_dataset: domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    least = len(DOMAINS[domain]) if task == "classify" else 1
    if min(n_train, n_val) < least or imgsz < 32 or max_objects < 1:
        raise ValueError(
            f"make_task_dataset: need n_train, n_val >= {least}, max_objects >= 1 and imgsz >= 32, got "
            f"n_train={n_train}, n_val={n_val}, imgsz={imgsz}, max_objects={max_objects}"
        )
    root = Path(root).resolve()
    names = DOMAINS[domain]
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, split_index, sorted(DOMAINS).index(domain), TASKS.index(task)])
        for i in range(n):
            stem = f"{domain}_{split}_{i:05d}"
            if task == "classify":
                img, _ = _shapes(rng, domain, imgsz, 1, cls=i % len(names))
                folder = root / split / names[i % len(names)]
                folder.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / f"{stem}.png"), img)
                continue
            img, shapes = _shapes(rng, domain, imgsz, int(rng.integers(1, max_objects + 1)))
            for sub in ("images", "labels"):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{stem}.png"), img)
            lines = "".join(_LABELS[task](c, mask) + "\n" for c, mask in shapes)
            (root / "labels" / split / f"{stem}.txt").write_text(lines)
    if task == "classify":
        return root
    extra = f"kpt_shape: {list(KPT_SHAPE)}\nflip_idx: {list(FLIP_IDX)}\n" if task == "pose" else ""
    listed = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n{extra}names:\n{listed}")
    return yaml
