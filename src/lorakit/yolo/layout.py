"""Memory layout of a YOLO model while it trains: channels-last on a CPU, the usual layout in files.

A 4-D tensor ``(N, C, H, W)`` is stored either row by row per channel (PyTorch's
default, "NCHW") or with each pixel's ``C`` values side by side ("channels-last",
NHWC in memory; the shape and every result are unchanged). oneDNN's CPU convolutions,
forward and backward, run markedly faster on channels-last: one training step of
yolo26n (batch 16, imgsz 160, one thread, a 2-core AMD EPYC) took 0.69x the time in
NCHW, yolo26n at 640 0.85x, yolo26s at 160 0.90x, for full fine-tuning and LoRA alike
(``bench/yolo_train_profile.py`` has the whole runs). Converting the model's 4-D
weights is enough: a convolution whose weight is channels-last gives a channels-last
output, and the layers after it follow.

Files keep the usual layout: ``safetensors`` refuses tensors that are not contiguous,
and a plain checkpoint should load and save in any tool as Ultralytics' own do, so
:func:`usual_layout` converts a model back while it is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def wanted(setting: bool | None, device: torch.device) -> bool:
    """Whether a run on ``device`` trains channels-last: ``setting``, or when None (auto) on a CPU only.

    Only CPUs were measured; on a GPU the gain depends on the card and on mixed precision, so
    it is left to the user (``channels_last=True``).
    """
    return device.type == "cpu" if setting is None else setting


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` channels-last, in place; returns ``model``.

    The tensors keep their identity (their ``.data`` is swapped), so an optimizer or EMA
    holding them sees the new storage.
    """
    _relayout(model, torch.channels_last)
    return model


def _relayout(model: nn.Module, layout: torch.memory_format) -> None:
    # not Module.to(memory_format=...): it also converts 5-D tensors, which channels_last refuses
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=layout)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@contextmanager
def usual_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model``'s 4-D tensors are in PyTorch's default layout (what gets pickled or
    saved); afterwards channels-last again if any was before. Values are untouched."""
    if not any(_is_channels_last(t) for t in [*model.parameters(), *model.buffers()]):
        yield model
        return
    _relayout(model, torch.contiguous_format)
    try:
        yield model
    finally:
        to_channels_last(model)
