"""What a YOLO adapter changes besides its LoRA factors, and how it is swapped.

A YOLO adapter trains some modules fully (``train_modules``: the class convs of a
new class count, and the BatchNorm layers with ``adapt_bn``) and may give the
head another class count and class names. lorakit's core keeps each adapter's
own copies of its fully trained modules and swaps them in with the adapter
(:mod:`lorakit.owned`); a :class:`Variant` adds what is YOLO's own: copies
resized for another class count (handed to the core when the adapter is loaded),
the class names and the head's attributes, set on every switch.

Shapes: a class conv is ``Conv2d(c, nc, 1)`` (a classifier's ``Linear(c, nc)``),
so an adapter for ``nc'`` classes gets a fresh ``Conv2d(c, nc', 1)`` before its
tensors are copied in; the head's ``nc`` and ``no = nc + 4 * reg_max`` follow.
"""

from __future__ import annotations

import json
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError
from ..io import AdapterFiles
from ..io_peft import PREFIX
from .targets import class_convs
from .trainer import YOLO_METADATA

HEAD_ATTRS = ("nc", "no", "kpt_shape", "nk")


def head(model: nn.Module) -> nn.Module | None:
    """The output head (last layer of ``model.model``), or ``None``."""
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None


@dataclass
class Variant:
    """One adapter's (or the base's) modules by path, class names and head attributes.

    ``modules`` are the adapter's copies of its fully trained modules, handed to
    :func:`lorakit.io.load_adapter`; the core installs them. :meth:`install` sets the rest.
    ``source`` is where an adapter came from: ``{"adapter": folder, **header}`` (its
    ``lorakit_yolo`` header entry: the run's ``data``...), for a merged checkpoint's
    ``train_args`` (:mod:`.provenance`); empty for the base.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module) -> Variant:
        """The model's names and head attributes (no modules)."""
        h = head(model)
        attrs = {a: getattr(h, a) for a in HEAD_ATTRS if h is not None and hasattr(h, a)}
        return cls({}, dict(getattr(model, "names", {}) or {}), attrs)

    def install(self, model: nn.Module) -> None:
        """Put these class names and head attributes into ``model`` (the core swaps the modules)."""
        if self.names:
            model.names = dict(self.names)  # type: ignore[assignment]
        h = head(model)
        for a, v in self.head.items():
            setattr(h, a, v)


def yolo_meta(files: AdapterFiles) -> dict[str, Any]:
    """The ``lorakit_yolo`` header entry of an adapter file (``{}`` for files without one)."""
    raw = files.metadata.get(YOLO_METADATA)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{files.weights_file}: header entry {YOLO_METADATA!r} is not JSON") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{files.weights_file}: header entry {YOLO_METADATA!r} is not a JSON object")
    return meta


def _resized(module: nn.Module, shape: torch.Size, where: str) -> nn.Module:
    """A fresh module like ``module`` with ``shape[0]`` outputs (a head for another class count)."""
    if isinstance(module, nn.Conv2d) and tuple(shape[1:]) == tuple(module.weight.shape[1:]):
        return nn.Conv2d(
            module.in_channels,
            shape[0],
            module.kernel_size,  # type: ignore[arg-type]
            module.stride,  # type: ignore[arg-type]
            module.padding,  # type: ignore[arg-type]
            module.dilation,  # type: ignore[arg-type]
            module.groups,
            module.bias is not None,
            module.padding_mode,
        )
    if isinstance(module, nn.Linear) and tuple(shape[1:]) == (module.in_features,):
        return nn.Linear(module.in_features, shape[0], module.bias is not None)
    raise ConfigError(
        f"{where}: the adapter's weight has shape {tuple(shape)}, the base's {type(module).__name__} has "
        f"{tuple(getattr(module, 'weight', torch.empty(0)).shape)}; only the output count of a head conv/linear "
        "may differ"
    )


def fresh_variant(model: nn.Module, base: Variant, paths: list[str], files: AdapterFiles) -> Variant:
    """Copies of the base's modules at ``paths``, resized to the file's tensors, with the file's names.

    The adapter's tensors are not copied here; :func:`lorakit.io.load_adapter` does that,
    into these copies, once they are installed.
    """
    meta = yolo_meta(files)
    out = Variant(
        names=dict(base.names), head=dict(base.head), source={"adapter": str(files.weights_file.parent), **meta}
    )
    for p in paths:
        module = deepcopy(base.modules[p])
        w = files.tensors.get(f"{PREFIX}{p}.weight")
        if w is not None and hasattr(module, "weight") and w.shape != module.weight.shape:
            module = _resized(module, w.shape, f"{files.weights_file} key {PREFIX}{p}.weight")
        out.modules[p] = module
    # the class count: the file's class convs say it; its header gives the names (or none: plain numbers)
    counts = {int(cast(Any, out.modules[p]).weight.shape[0]) for p in paths if p in class_convs(model)}
    names = meta.get("names")
    if isinstance(names, dict) and names:
        out.names = {int(k): str(v) for k, v in names.items()}
    elif counts and counts != {len(out.names)}:
        out.names = {i: str(i) for i in range(max(counts))}
    if counts and counts != {len(out.names)}:
        raise ConfigError(
            f"{files.weights_file}: its class convs have {sorted(counts)} outputs but its header names "
            f"{len(out.names)} classes"
        )
    if "nc" in out.head:
        nc = len(out.names)
        out.head["nc"] = nc
        h = head(model)
        if "no" in out.head and h is not None and hasattr(h, "reg_max"):
            out.head["no"] = nc + 4 * int(cast(Any, h).reg_max)
    if isinstance(meta.get("kpt_shape"), list) and "kpt_shape" in out.head:
        out.head["kpt_shape"] = tuple(meta["kpt_shape"])
        out.head["nk"] = int(torch.tensor(meta["kpt_shape"]).prod())
    return out
