"""Moved: the plan of a mixed batch is in :mod:`lorakit.layers.mixed_plan`, and each
per-sample kernel lives with its layer type (:mod:`lorakit.layers.linear`,
:mod:`lorakit.layers.conv`, :mod:`lorakit.layers.embedding`); the names stay importable
from here."""

from __future__ import annotations

from .layers.conv import conv_mixed
from .layers.embedding import embedding_mixed
from .layers.linear import linear_mixed
from .layers.mixed_plan import Grid, MixedPlan, check_batch

__all__ = ["Grid", "MixedPlan", "check_batch", "conv_mixed", "embedding_mixed", "linear_mixed"]
