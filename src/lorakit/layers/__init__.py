"""The LoRA layer types: one module per type, each owning its handler.

:mod:`~lorakit.layers.base` holds what every type shares (the adapted layer
:class:`LoraLayer`, its adapters, wrap and unwrap, the handler protocol and registry);
:mod:`~lorakit.layers.linear` (with the fused training node
:mod:`~lorakit.layers.fused_linear`), :mod:`~lorakit.layers.conv` and
:mod:`~lorakit.layers.embedding` each hold one built-in type: its handler (factor shapes,
init, forward, delta weight, mixed-batch plan and kernel, file layout) and its
``register`` call. Importing this package registers them. A new layer type is one
:class:`LayerHandler` subclass and one :func:`register` call, wherever it is defined.
"""

from __future__ import annotations

from .base import (
    LayerHandler,
    LoraAdapter,
    LoraLayer,
    adapter_dict,
    handler_for,
    live_rank,
    lora_class_for,
    register,
    unwrap,
    wrap,
)
from .base import _restore as _restore  # pickles made before the move name lorakit.layers._restore
from .conv import CONV_FORM_ATTR, ConvHandler
from .embedding import EmbeddingHandler
from .linear import LinearHandler

__all__ = [
    "CONV_FORM_ATTR",
    "ConvHandler",
    "EmbeddingHandler",
    "LayerHandler",
    "LinearHandler",
    "LoraAdapter",
    "LoraLayer",
    "adapter_dict",
    "handler_for",
    "live_rank",
    "lora_class_for",
    "register",
    "unwrap",
    "wrap",
]
