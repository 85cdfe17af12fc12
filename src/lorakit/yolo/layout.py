"""Memory layout of a YOLO model while it trains: channels-last on an x86 CPU too, the usual layout in files.

A 4-D tensor ``(N, C, H, W)`` is stored either row by row per channel (PyTorch's
default, "NCHW") or with each pixel's ``C`` values side by side ("channels-last",
NHWC in memory; the shape and every result are unchanged up to summation order).
Ultralytics has a ``channels_last`` setting: by default (None) it trains channels-last
on CUDA only and ignores ``True`` on a CPU (its comment says there is no benefit there),
while its CPU *inference* goes channels-last on x86 with oneDNN. Measured here, oneDNN's
CPU convolutions are faster on channels-last in training too, forward and backward:
one training step (one thread, a 2-core AMD EPYC with AVX-512) took 0.69-0.79x the time
at yolo26n, batch 16, imgsz 160, 0.85x at imgsz 640 (batch 8), 0.90x on yolo26s at 160,
for full fine-tuning and LoRA alike (whole runs: ``bench/yolo_train_profile.py``).

So lorakit's trainers read the same setting and, where it is None, also train
channels-last on the CPUs where Ultralytics infers channels-last (Linux, x86-64,
oneDNN on); ``channels_last=False`` keeps the usual layout, ``True`` forces it.
Converting the model's 4-D weights is enough: a convolution whose weight is
channels-last gives a channels-last output, and the layers after it follow.

Files keep the usual layout: ``safetensors`` refuses tensors that are not contiguous, and
a checkpoint must fuse in any Ultralytics (its comment says released versions fuse with
``.view()``, which fails on channels-last weights). Ultralytics 8.4.190, installed here,
pickles a usual-layout copy itself; which earlier releases do is not checked, and lorakit
accepts Ultralytics from 8.3.50, so :func:`usual_layout` converts a model back while it is
written (about 5 ms for yolo26n).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..layers.conv import is_channels_last


def wanted(setting: bool | None, device: torch.device) -> bool:
    """Whether lorakit converts a model training on ``device`` to channels-last.

    ``setting`` is the run's ``channels_last`` (Ultralytics' key). None (auto): on a CPU
    where Ultralytics' own CPU inference goes channels-last (Linux on x86-64 with oneDNN
    enabled); on CUDA Ultralytics converts the model itself, so not here.
    """
    if setting is not None:
        return bool(setting)
    return (
        device.type == "cpu"
        and platform.system() == "Linux"
        and platform.machine() in {"x86_64", "AMD64"}
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and bool(torch.backends.mkldnn.enabled)
    )


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` channels-last, in place; returns ``model``.

    The tensors keep their identity (their ``.data`` is swapped), so an optimizer or EMA
    holding them sees the new storage.
    """
    _relayout(model, torch.channels_last)
    return model


def to_usual_layout(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` in PyTorch's default layout, in place; returns
    ``model``. Two models in the same layout run the same kernels: needed where outputs are compared
    bitwise, since the layouts sum in different orders."""
    _relayout(model, torch.contiguous_format)
    return model


def _relayout(model: nn.Module, layout: torch.memory_format) -> None:
    # not Module.to(memory_format=...): it also converts 5-D tensors, which channels_last refuses
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=layout)


@contextmanager
def usual_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model``'s channels-last 4-D tensors are in PyTorch's default layout (what gets
    pickled or saved). Afterwards each gets its own storage back, holding whatever the block wrote:
    views taken before (Ultralytics' EMA keeps its tensors in a list and updates them in place) stay
    the model's tensors. Values are untouched."""
    originals = [(t, t.data) for t in [*model.parameters(), *model.buffers()] if is_channels_last(t)]
    for t, data in originals:
        t.data = data.contiguous()
    try:
        yield model
    finally:
        for t, data in originals:
            data.copy_(t.data)  # e.g. Ultralytics' save_model resyncing a non-finite EMA tensor
            t.data = data
