"""Layer type -> handler: how LoRA attaches to each kind of layer.

The handler protocol and the registry live beside :class:`~lorakit.layers.base.LoraLayer`
in :mod:`lorakit.layers.base`; this module keeps the names importable from here.
"""

from __future__ import annotations

from .layers.base import LAZY, LayerHandler, handler_for, register, registered_types

__all__ = ["LAZY", "LayerHandler", "handler_for", "register", "registered_types"]
