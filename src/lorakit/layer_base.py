"""Moved to :mod:`lorakit.layers.base`; the names stay importable from here (users and
pickles made before the move name ``lorakit.layer_base``)."""

from __future__ import annotations

from .layers.base import (
    LAZY,
    STRUCTURE,
    LayerHandler,
    LoraAdapter,
    LoraLayer,
    adapter_dict,
    all_plain,
    bump_structure,
    handler_for,
    live_rank,
    lora_class_for,
    register,
    registered_types,
    unwrap,
    watch_structure,
    wrap,
)
from .layers.base import _restore as _restore
from .layers.conv import CONV_FORM_ATTR

__all__ = [
    "CONV_FORM_ATTR",
    "LAZY",
    "STRUCTURE",
    "LayerHandler",
    "LoraAdapter",
    "LoraLayer",
    "adapter_dict",
    "all_plain",
    "bump_structure",
    "handler_for",
    "live_rank",
    "lora_class_for",
    "register",
    "registered_types",
    "unwrap",
    "watch_structure",
    "wrap",
]
