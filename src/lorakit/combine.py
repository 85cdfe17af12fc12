"""Combine adapters into a new one whose delta is a weighted sum of theirs.

For adapters ``i`` with weights ``w_i``, on every layer that has any of them::

    target delta  D = sum_i w_i * s_i * dW_i          dW_i = the handler's delta_weight(A_i, B_i)

Three methods build the new adapter (its scaling is always 1, ``alpha = r``):

``"cat"``  exact. The ranks are concatenated: ``A = [A_1; A_2; ...]`` and
           ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``, so ``B A = sum_i w_i s_i B_i A_i``
           and ``r = sum_i r_i``. A grouped conv keeps its rank rows grouped (``r/G``
           per group, group after group), so the concatenation is done within each
           group: new group g = [group g of A_1; group g of A_2; ...].
``"svd"``  the best rank-``r`` approximation of ``D`` (Eckart-Young): a truncated SVD
           of ``D`` as a matrix (Linear ``(out, in)``; Embedding ``D^T``, ``(dim, V)``,
           since its delta is ``(B A)^T``; a conv with G groups: each group's
           ``(out/G, in/G * prod(k))`` block, at rank ``r/G``). The Frobenius error is
           the norm of the discarded singular values; at ``r >= rank(D)`` it is exact up
           to rounding. ``B = U sqrt(S)``, ``A = sqrt(S) V^T``. ``r=None``: the largest
           rank of the adapters combined on that layer.
``"linear"`` PEFT's ``combination_type="linear"``: same rank, weighted sums of the
           factors, ``A = sum_i sign(c_i) sqrt|c_i| A_i``, ``B = sum_i sqrt|c_i| B_i`` with
           ``c_i = w_i s_i``. Then ``B A = sum_i c_i B_i A_i`` plus cross terms
           ``sqrt|c_i c_j| sign(c_j) B_i A_j`` (i != j), so it equals ``D`` only for one
           adapter, or when the cross terms vanish. It is an approximation kept for
           PEFT parity; prefer ``"cat"`` (exact) or ``"svd"`` (optimal at a given rank).

Layers where an adapter is absent contribute nothing for it. Computation is in fp32;
the new factors take the dtype of the first adapter's factors on each layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from . import state
from .adapters import _check_finite, _names
from .config import LoraConfig
from .errors import ConfigError
from .inject import _check_name
from .layers import LoraAdapter, LoraLayer
from .state import lora_layers

METHODS = ("cat", "svd", "linear")


@dataclass(frozen=True)
class CombinedLayer:
    """One layer of a combined adapter: rank ``r``, ``norm`` = ||D||_F of the target delta
    and ``error`` = ||D - B A||_F of what was built (0 up to rounding for ``"cat"``)."""

    path: str
    r: int
    norm: float
    error: float


@dataclass(frozen=True)
class CombineReport:
    """What :func:`combine_adapters` built."""

    adapter: str
    method: str
    layers: tuple[CombinedLayer, ...]

    @property
    def relative_error(self) -> float:
        """``sqrt(sum error^2) / sqrt(sum norm^2)`` over all layers (0 when every target is 0)."""
        num = math.sqrt(sum(t.error**2 for t in self.layers))
        den = math.sqrt(sum(t.norm**2 for t in self.layers))
        return num / den if den else 0.0


def _cat(layer: LoraLayer, terms: list[tuple[float, LoraAdapter]]) -> tuple[torch.Tensor, torch.Tensor]:
    g = layer.lora_handler.rank_groups(layer)
    As, Bs = [], []
    for w, ad in terms:
        A = ad.A.detach().float()
        As.append(A.reshape(g, A.shape[0] // g, *A.shape[1:]))  # (G, r_i/G, ...): rank rows by group
        Bs.append(w * ad.scaling.float() * ad.B.detach().float())  # (out, r_i/G, ...): per-group columns
    A = torch.cat(As, dim=1)
    return A.reshape(-1, *A.shape[2:]), torch.cat(Bs, dim=1)


def _linear(layer: LoraLayer, path: str, terms: list[tuple[float, LoraAdapter]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {ad.A.shape[0] for _, ad in terms}
    if len(ranks) != 1:
        raise ConfigError(
            f"combine_adapters(method='linear'): {path or '<root>'} has adapters of ranks {sorted(ranks)}; "
            "'linear' needs equal ranks (use 'cat' or 'svd')"
        )
    A = torch.zeros_like(terms[0][1].A, dtype=torch.float32)
    B = torch.zeros_like(terms[0][1].B, dtype=torch.float32)
    for w, ad in terms:
        c = w * float(ad.scaling)
        root = math.sqrt(abs(c))
        A += math.copysign(root, c) * ad.A.detach().float()
        B += root * ad.B.detach().float()
    return A, B


def _orientation(layer: LoraLayer, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """True when the handler's delta is ``(B A)^T`` (Embedding), False for ``B A``; found by a probe."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(a_shape, generator=gen)
    B = torch.randn(b_shape, generator=gen)
    BA = B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
    delta = layer.lora_handler.delta_weight(layer, A, B)
    for transposed, want in ((False, BA), (True, BA.t())):
        if delta.numel() == want.numel():
            d = delta.reshape(want.shape)
            if torch.allclose(d, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                return transposed
    raise ConfigError(
        f"combine_adapters(method='svd'): cannot factor deltas of {type(layer).__name__}: its handler's "
        "delta_weight is neither B A nor (B A)^T"
    )


def _svd(layer: LoraLayer, D: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    handler = layer.lora_handler
    a_shape, b_shape = handler.factor_shapes(layer, r)
    g = handler.rank_groups(layer)
    if g > 1:
        M = D.reshape(g, D.shape[0] // g, -1)  # (G, out/G, in/G * prod(k)): a grouped delta's blocks, B_g A_g
    else:
        transposed = _orientation(layer, a_shape, b_shape)
        M = (D.t() if transposed else D.reshape(b_shape[0], -1)).unsqueeze(0)
    rg = r // g
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = min(rg, S.shape[-1])
    root = S[:, :k].sqrt()
    Bm = M.new_zeros((g, M.shape[1], rg))
    Am = M.new_zeros((g, rg, M.shape[2]))
    Bm[:, :, :k] = U[:, :, :k] * root[:, None, :]
    Am[:, :k] = root[:, :, None] * Vh[:, :k]
    return Am.reshape(a_shape), Bm.reshape(b_shape)


def combine_adapters(
    model: nn.Module,
    names: str | Sequence[str],
    weights: Sequence[float] | None = None,
    new_name: str = "combined",
    method: str = "cat",
    r: int | None = None,
) -> CombineReport:
    """Add adapter ``new_name`` whose delta is ``sum_i weights[i] * s_i * dW_i`` (see the
    module docstring for the methods and what each is exact for).

    The new adapter is added inactive and frozen (``set_adapter`` it to use it), with
    scaling 1 (``alpha = r`` per layer), the dropout of ``names[0]``, and no
    ``train_modules``/bias of its own: while it is active the base's modules and biases run.
    The sources are left as they were; :func:`lorakit.save_adapter` can write the result.

    Args:
        names: the adapters to combine.
        weights: one finite number per name; default all 1.
        new_name: name of the new adapter (letters, digits, ``_``, ``-``), not yet used.
        method: ``"cat"`` (default, exact), ``"svd"`` or ``"linear"``.
        r: rank for ``"svd"`` (default: the largest source rank on each layer; a multiple
            of ``groups`` for grouped convs). Not used by the other methods.

    Returns:
        :class:`CombineReport` with each layer's rank, target norm and error.

    Raises:
        AdapterNotFoundError: an unknown name.
        ConfigError: bad arguments, a taken ``new_name``, unequal ranks for ``"linear"``, a DoRA adapter.
        TargetError: ``r`` does not fit a layer (``r % groups != 0``).
        NonFiniteError: a source adapter holds NaN/Inf.
        Nothing is changed when anything is raised.
    """
    wanted = _names(model, names)
    if not wanted or len(set(wanted)) != len(wanted):
        raise ConfigError(f"combine_adapters: names must be distinct and non-empty, got {list(wanted)}")
    ws = [1.0] * len(wanted) if weights is None else list(weights)
    if len(ws) != len(wanted) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in ws
    ):
        raise ConfigError(f"combine_adapters: weights must be {len(wanted)} finite numbers, got {weights!r}")
    if method not in METHODS:
        raise ConfigError(f"combine_adapters: method must be one of {METHODS}, got {method!r}")
    if r is not None and method != "svd":
        raise ConfigError(f"combine_adapters: r={r!r} applies only to method='svd' ('{method}' fixes the rank)")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ConfigError(f"combine_adapters: r must be an int > 0, got {r!r}")
    dora = sorted({n for _, layer in lora_layers(model) for n in wanted if n in layer.lora and
                   cast(LoraAdapter, layer.lora[n]).variant != "lora"})  # fmt: skip
    if dora:
        raise ConfigError(
            f"combine_adapters: {dora} are DoRA adapters; their merge is not an added delta, so they cannot be "
            "combined into one LoRA"
        )
    _check_name(model, new_name)
    _check_finite(model, wanted)

    plans: list[tuple[str, LoraLayer, torch.Tensor, torch.Tensor, CombinedLayer, torch.dtype]] = []
    for path, layer in lora_layers(model):
        terms = [
            (float(w), cast(LoraAdapter, layer.lora[n])) for n, w in zip(wanted, ws, strict=True) if n in layer.lora
        ]
        if not terms:
            continue
        handler = layer.lora_handler
        weight = getattr(layer, handler.weight_name)
        D = torch.zeros(handler.weight_shape(layer), dtype=torch.float32, device=weight.device)
        for w, ad in terms:
            D += w * ad.scaling.float() * handler.delta_weight(layer, ad.A.detach().float(), ad.B.detach().float())
        if method == "cat":
            A, B = _cat(layer, terms)
        elif method == "linear":
            A, B = _linear(layer, path, terms)
        else:
            rank = r if r is not None else max(ad.A.shape[0] for _, ad in terms)
            handler.check(layer, rank, path or "<root>")
            A, B = _svd(layer, D, rank)
        error = float((D - handler.delta_weight(layer, A, B)).norm())
        norm = float(D.norm())
        if method == "cat" and error > 1e-4 * max(norm, 1e-12):
            raise ConfigError(
                f"combine_adapters(method='cat'): {path or '<root>'} ({type(layer).__name__}) has a factor layout "
                "the rank concatenation does not know (rank not dim 0 of A and dim 1 of B); use method='svd'"
            )
        plans.append((path, layer, A, B, CombinedLayer(path or "<root>", A.shape[0], norm, error), terms[0][1].A.dtype))

    cfgs = state.of(model).configs
    first = cfgs.get(wanted[0])
    ranks = [p[2].shape[0] for p in plans]
    common = max(set(ranks), key=ranks.count)
    exact = {p[0]: f"re:{re.escape(p[0])}" for p in plans}
    config = LoraConfig(
        r=common,
        targets=tuple(exact.values()),
        rank_pattern={exact[p]: int(A.shape[0]) for p, _, A, *_ in plans if A.shape[0] != common},
        dropout=first.dropout if first is not None else 0.0,
        batchnorm=first.batchnorm if first is not None else "frozen",
    )
    with torch.no_grad():
        for _, layer, A, B, info, dtype in plans:
            ad = LoraAdapter(
                tuple(A.shape),
                tuple(B.shape),
                r=info.r,
                alpha=float(info.r),
                scaling=1.0,
                dropout=config.dropout,
                dtype=dtype,
                device=A.device,
            )
            ad.A.copy_(A)
            ad.B.copy_(B)
            ad.requires_grad_(False)
            ad.train(layer.training)
            layer.lora[new_name] = ad
            layer.lora_refresh()
    cfgs[new_name] = config
    return CombineReport(adapter=new_name, method=method, layers=tuple(p[4] for p in plans))
