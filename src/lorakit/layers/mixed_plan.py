"""The plan of :func:`lorakit.mixed_batch`: one layer's factors in the form its handler's
per-sample kernel reads, and the samples grouped by adapter.

Every layer type's handler builds one on entry to the block
(:meth:`~lorakit.layers.base.LayerHandler.mixed_plan`) and reads it in its
``mixed_forward``; the kernels live with their layer types (:mod:`lorakit.layers.linear`,
:mod:`lorakit.layers.conv`, :mod:`lorakit.layers.embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MixedBatchError


@dataclass(frozen=True)
class MixedPlan:
    """One layer's factors for a mixed batch, in the form its handler reads.

    Conv and Embedding read the stacks (K adapters plus an all-zero "no adapter" slot K,
    ranks zero-padded to the largest): ``A`` (K+1, r_max, *A_shape[1:]), ``B`` (K+1,
    *B_shape with rank r_max), ``scaling`` (K+1,). Linear reads, with one adapter, its
    own ``A_cat`` (r, in) and ``B_cat`` (out, r) and ``mask`` (N, 1), s where the sample
    uses it, else 0; with several, a :class:`Grid` and each grid row's factors as
    ``At`` (G, in, r_max) = (s A)^T and ``Bt`` (G, r_max, out) = B^T (transposed views).
    """

    index: torch.Tensor  # (N,) slot per sample; slot K is "no adapter"
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scaling: torch.Tensor | None = None
    A_cat: torch.Tensor | None = None
    B_cat: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    grid: Grid | None = None
    At: torch.Tensor | None = None
    Bt: torch.Tensor | None = None
    samples: torch.Tensor | None = None  # grid.samples on this layer's device
    keep: torch.Tensor | None = None  # grid.keep in this layer's dtype and device


@dataclass(frozen=True)
class Grid:
    """The samples that use an adapter, grouped by adapter into G rows of S samples.

    S is the balanced group size ``ceil(used / K)``; an adapter with more samples
    takes several rows, the last row of each adapter is padded. So at most
    ``K + used / S <= 2 K`` rows and fewer than ``K S`` padding slots: the batched
    products do at most about twice the exact LoRA work, and usually exactly it.

    Attributes:
        samples: (G * S,) sample index of each slot, row by row (padding repeats a real one).
        slot: (G,) the adapter slot of each row.
        keep: (G, S, 1) 1 for real slots, 0 for padding; None when nothing is padded.
        identity: the rows are the slots 0..K-1 in order (no factor needs repeating).
    """

    samples: torch.Tensor
    slot: torch.Tensor
    keep: torch.Tensor | None
    rows: int
    size: int
    identity: bool


def check_batch(plan: MixedPlan, x: torch.Tensor) -> int:
    """The batch size of ``x`` (dim 0).

    Raises:
        MixedBatchError: it is not the number of names ``mixed_batch`` was given.
    """
    n = plan.index.shape[0]
    if x.shape[0] != n:
        raise MixedBatchError(f"mixed_batch was given {n} adapter names but the batch has {x.shape[0]} samples")
    return n
