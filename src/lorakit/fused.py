"""Moved to :mod:`lorakit.layers.fused_linear` (the fused LoRA Linear lives with its layer
type); the names stay importable from here."""

from __future__ import annotations

from .layers.fused_linear import MERGE_ROWS, LoraLinearFn, dropped_positions, new_seed, rebuild, rebuilt_from

__all__ = ["MERGE_ROWS", "LoraLinearFn", "dropped_positions", "new_seed", "rebuild", "rebuilt_from"]
