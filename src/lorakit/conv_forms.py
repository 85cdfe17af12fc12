"""Choose each adapted convolution's LoRA form by timing both at the shape it really sees.

A LoRA conv can run in two forms that give the same numbers (see
:class:`lorakit.layers.ConvHandler`): the *activation* form
``conv(x, W) + B(conv(x, A))`` adds two thin convolutions, the *weight* form
``conv(x, W + s B A)`` runs one conv but its backward computes the whole weight
gradient ``dW`` (``out x in/G x k`` per output pixel) to get ``dA`` and ``dB``.
``mode="auto"`` picks by multiply-add counts, but thin convolutions (``r`` output
channels) run far below a CPU's GEMM speed, so counts mislead: on yolo26n at batch
16 and imgsz 160 (2-core x86 CPU, one thread) the count rule's choice cost 1.2x full
fine-tuning's conv time and the per-layer faster form 1.0x (bench/conv_forms.py).

:func:`measure_conv_forms` runs the model once to record each LoRA conv's input
shape, then times one forward + backward of each layer alone in each form (input
requiring grad, a random output gradient) on ``1/shrink`` of the batch, and records
the faster form on the layer (``lora_conv_form``, with the rank it was measured
for: a change of adapters falls back to the count rule). Training steps then use it
whenever ``ConvHandler.mode`` is ``"auto"``. Layers with LoRA dropout take the
activation form whatever is recorded (dropout acts on A's input).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from .layers import CONV_FORM_ATTR, ConvHandler, LoraLayer, live_rank
from .layers.conv import is_channels_last
from .state import lora_layers

FORMS = ("activation", "weight")


@contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Buffers (BatchNorm running statistics) restored after a training-mode forward."""
    buffers = {name for name, _ in model.named_buffers()}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if k in buffers}
    try:
        yield
    finally:
        with torch.no_grad():
            state = model.state_dict()
            for k, v in saved.items():
                state[k].copy_(v)


def input_shapes(model: nn.Module, forward: Callable[[], object]) -> dict[str, tuple[int, ...]]:
    """The input shape each LoRA conv of ``model`` sees in ``forward()`` (run without gradients;
    buffers such as BatchNorm statistics are left as they were)."""
    convs = {path: layer for path, layer in lora_layers(model) if isinstance(layer.lora_handler, ConvHandler)}
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(path, tuple(args[0].shape))

        return hook

    hooks = [layer.register_forward_pre_hook(recorder(path)) for path, layer in convs.items()]
    try:
        with _state_kept(model), torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _clock(cuda: bool) -> float:
    """CUDA: wall time after the queued work finished. CPU: this process's CPU time, which counts the
    compute and not the time other processes hold the cores (a shared machine's noise)."""
    if cuda:
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_forms(layer: LoraLayer, shape: tuple[int, ...], reps: int = 1) -> dict[str, float]:
    """Seconds of one forward + backward of ``layer`` alone in each form at input ``shape``
    (the best of ``reps`` after one warm-up). Gradients of the layer's parameters are left as they were."""
    m = cast(nn.Conv2d, layer)
    weight = m.weight
    x = torch.randn(shape, dtype=weight.dtype, device=weight.device)
    if is_channels_last(weight):
        x = x.contiguous(memory_format=torch.channels_last)  # a channels-last conv gets (and gives) channels-last
    x.requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    for p in params:  # backward would accumulate into an existing .grad
        p.grad = None
    previous = layer.__dict__.get(CONV_FORM_ATTR)
    cuda = weight.is_cuda
    out: dict[str, float] = {}
    try:
        gy = None
        for form in FORMS:
            layer.__dict__[CONV_FORM_ATTR] = (form, live_rank(layer))
            best = math.inf
            for i in range(reps + 1):
                t0 = _clock(cuda)
                y = layer(x)
                if gy is None:
                    gy = torch.randn_like(y)
                y.backward(gy)
                if i:  # the first run is a warm-up (kernel selection, caches)
                    best = min(best, _clock(cuda) - t0)
                x.grad = None
            out[form] = best
    finally:
        if previous is None:
            layer.__dict__.pop(CONV_FORM_ATTR, None)
        else:
            layer.__dict__[CONV_FORM_ATTR] = previous
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    return out


def measure_conv_forms(
    model: nn.Module, forward: Callable[[], object], *, shrink: int = 4, reps: int = 1
) -> dict[str, dict[str, float]]:
    """Time both forms of every LoRA conv of ``model`` at the input shape it sees in ``forward()`` and
    record the faster one on the layer (used while ``ConvHandler.mode`` is ``"auto"``).

    Args:
        model: a model with LoRA convolutions (other layers are left alone).
        forward: runs ``model`` on a batch of the shape training will use (e.g. zeros).
        shrink: time on ``ceil(batch / shrink)`` samples (the choice hardly depends on the
            batch size; the time spent does).
        reps: timed runs per form after one warm-up (the fastest counts).

    Returns:
        ``{path: {"activation": s, "weight": s, "chosen": 0.0 or 1.0 (1 = weight)}}`` for each conv measured.
    """
    if shrink < 1 or reps < 1:
        raise ValueError(f"measure_conv_forms: shrink and reps must be >= 1, got shrink={shrink}, reps={reps}")
    shapes = input_shapes(model, forward)
    layers = dict(lora_layers(model))
    result: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.train()
    try:
        for path, shape in shapes.items():
            layer = layers[path]
            if not layer._lora_live:
                continue
            small = (max(1, math.ceil(shape[0] / shrink)), *shape[1:])
            seconds = time_forms(layer, small, reps)
            form = min(FORMS, key=lambda f: seconds[f])
            layer.__dict__[CONV_FORM_ATTR] = (form, live_rank(layer))
            result[path] = {**seconds, "chosen": float(form == "weight")}
    finally:
        model.train(was_training)
    return result
