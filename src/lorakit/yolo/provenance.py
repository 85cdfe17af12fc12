"""What a merged YOLO checkpoint says about itself: the adapter run's data, and that it is a LoRA merge.

Ultralytics keeps a run's settings in a checkpoint's ``train_args``, and
``yolo val model=x.pt`` without ``data=`` validates on ``train_args["data"]``
(``Model._reset_ckpt_args`` keeps ``data``, ``imgsz``, ``task`` and
``single_cls``). ``YOLO.save`` writes the loaded checkpoint's keys back, so a
base with an adapter merged in would carry the *base's* run: its data set, with
the adapter's class names. A merged checkpoint therefore gets the adapter run's
``data`` and ``imgsz`` (recorded in the adapter's header, see
:func:`lorakit.yolo.trainer.yolo_metadata`) and a ``description`` naming the
adapter and the base.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..io_format import atomic_write

RUN_KEYS = ("data", "imgsz")  # what the adapter's header records of its run, for merged checkpoints


def merge_description(adapter: str | Path, base: str | Path | None, data: Any) -> str:
    """``"LoRA merge: adapter <adapter> merged into base <base>; adapter trained on <data>"``."""
    into = f"base {base}" if base else "its base model"
    trained = f"adapter trained on {data}" if data else "the adapter's training data is not recorded"
    return f"LoRA merge: adapter {adapter} merged into {into}; {trained}"


def merged_checkpoint(base_ckpt: dict[str, Any] | None, adapter: dict[str, Any], base: str | None) -> dict[str, Any]:
    """The base's checkpoint keys with the adapter run's ``train_args`` and a merge ``description``.

    Args:
        base_ckpt: the base's checkpoint dict (``YOLO(...).ckpt``), or ``None``.
        adapter: ``{"adapter": folder, **header}``: the adapter's folder and its ``lorakit_yolo``
            header entry (``task``, ``names``, and from a LoRA run ``data`` and ``imgsz``).
        base: the base's file, for the description.

    An adapter without a recorded ``data`` (an older or a PEFT-format file) gets no
    ``data`` at all rather than the base's: validating then needs ``data=``.
    """
    ckpt = dict(base_ckpt or {})
    args = dict(ckpt.get("train_args") or {})
    for key in RUN_KEYS:
        if adapter.get(key) is not None:
            args[key] = adapter[key]
        elif key == "data":
            args.pop(key, None)
    if adapter.get("task"):
        args["task"] = adapter["task"]
    ckpt["train_args"] = args
    ckpt["description"] = merge_description(adapter.get("adapter", "?"), base, adapter.get("data"))
    return ckpt


@contextmanager
def recorded_merge(yolo: Any, adapter: dict[str, Any] | None) -> Iterator[None]:
    """Inside the block ``yolo.ckpt`` (what ``YOLO.save`` writes besides the model) is
    :func:`merged_checkpoint`'s; ``adapter`` ``None`` (no adapter active) leaves it as it is."""
    if adapter is None:
        yield
        return
    ckpt = yolo.ckpt
    yolo.ckpt = merged_checkpoint(ckpt, adapter, getattr(yolo, "ckpt_path", None))
    try:
        yield
    finally:
        yolo.ckpt = ckpt


def describe_checkpoint(path: Path, description: str) -> None:
    """Set ``description`` in an Ultralytics checkpoint written a moment ago (atomically).

    Raises:
        OSError: the file cannot be read or written (the message names it).
    """
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # this run's own file, just written
    ckpt["description"] = description
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write(path, buffer.getvalue())
