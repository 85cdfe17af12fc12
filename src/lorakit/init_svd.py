"""PiSSA and OLoRA: LoRA factors taken from the base weight, which keeps only the rest.

Both start the adapter at a rank-``r`` part of the base weight ``W`` (as nn.Linear
holds it, ``(out, in)``) and replace ``W`` by the residual, so the adapted layer
computes exactly what it did before (up to float rounding)::

    W_res = W - s * B0 A0        W_res + s * B0 A0 = W         s = alpha / r (rsLoRA: alpha / sqrt(r))

* ``"pissa"`` (Meng et al. 2024, "Principal Singular values and Singular vectors
  Adaptation"): ``W = U S V^T`` (full SVD, ``torch.linalg.svd``);
  ``B0 = U_r diag(sqrt(S_r / s))`` ``(out, r)``, ``A0 = diag(sqrt(S_r / s)) V_r^T``
  ``(r, in)``, so ``s B0 A0 = U_r S_r V_r^T``, the best rank-r approximation of W,
  and training moves the principal directions. PEFT's ``pissa_init`` exactly.
* ``"pissa_niter_N"``: the same from ``torch.svd_lowrank(W, r, niter=N)``, a randomised
  SVD with ``N`` subspace iterations: ``O(out in r)`` instead of ``O(out in min(out, in))``,
  an approximation of the top-r part (it draws from torch's global random generator).
* ``"olora"`` (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): ``W = Q R``
  (reduced QR); ``B0 = Q[:, :r]`` ``(out, r)``, ``A0 = R[:r]`` ``(r, in)``. PEFT's ``olora_init``
  (lorakit also handles transformers' transposed ``Conv1D`` weight, which PEFT's does not).

The factorisation runs in float32 (float64 for float64 weights), and the residual is written
back in the weight's dtype and layout. Supported: ``nn.Linear`` and transformers' ``Conv1D``
(weight stored ``(in, out)``). PEFT defines neither init for convolutions or embeddings, so
lorakit refuses them rather than write files PEFT could not reproduce; non-float (quantised)
weights are refused too.

Because the base weight changed, an adapter saved as it is belongs to the residual base
(its base fingerprint says so). ``lorakit.save_adapter(..., original_base=True)`` writes it
instead as an ordinary LoRA on the original weights, via :func:`as_lora_on_original`:

    W_res + s B A - W = s (B A - B0 A0) = s [B, -B0] [A; A0]        rank 2r, alpha' so that s' = s

The factors at init (``A0``, ``B0``) and the original weight's fingerprint are kept with the
model for that (:func:`recorded`).

As in PEFT, the residual stays the base: ``lorakit.disabled()``, ``delete_adapter`` and ``unload``
give the residual model, not the original one; ``merge_and_unload`` gives the trained model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from . import state
from .errors import ConfigError, TargetError, check_materialised
from .io_fingerprint import fingerprint, same_base
from .layer_base import LayerHandler
from .layers import LinearHandler, LoraAdapter
from .peft_names import PISSA_NITER, SVD_INITS


@dataclass(frozen=True)
class Initial:
    """One layer's adapter at init: its factors, and fingerprints (:func:`lorakit.io_format.fingerprint`)
    of the base weight before the init (``original``) and after it (``residual``)."""

    A: torch.Tensor
    B: torch.Tensor
    original: dict[str, Any]
    residual: dict[str, Any]


def _transposed(handler: LayerHandler, where: str) -> bool:
    """Whether ``handler``'s weight is stored ``(in, out)``; refuses layer types without a defined init."""
    if type(handler) is LinearHandler:
        return False
    conv1d = sys.modules.get("lorakit.hf.conv1d")  # registered only once lorakit.hf is imported
    if conv1d is not None and type(handler) is conv1d.Conv1DHandler:
        return True
    raise TargetError(
        f"{where}: PiSSA/OLoRA init needs a plain Linear or transformers Conv1D layer, got one handled by "
        f"{type(handler).__name__}; PEFT defines these inits for Linear layers only (not for convolutions, "
        "embeddings or fused parts); exclude the layer or use init='kaiming'"
    )


def factorise(W: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)``, shapes ``(r, in)`` and ``(out, r)``, for weight ``W`` ``(out, in)`` (module docstring).

    Computes in ``W``'s dtype; the caller passes float32 or float64.

    Raises:
        ConfigError: ``init`` is not a PiSSA/OLoRA name.
    """
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = PISSA_NITER.fullmatch(init)
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r]
    elif niter is not None:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter.group(1)))
        Ur, Sr, Vhr = U, S, V.t()
    else:
        raise ConfigError(f"init {init!r} is not one of {SVD_INITS}")
    root = torch.sqrt(Sr / scaling)
    return (root[:, None] * Vhr).contiguous(), (Ur * root).contiguous()


def check(module: nn.Module, handler: LayerHandler, r: int, init: str, where: str) -> bool:
    """Refuse what :func:`init_from_weight` cannot do, before anything changes; True when the
    weight is stored transposed (``(in, out)``, transformers' ``Conv1D``).

    Raises:
        TargetError: the layer type has no PiSSA/OLoRA init, the weight is not floating point
            (e.g. quantised), adapters are merged into it, or ``r`` exceeds ``min(out, in)``.
        MetaTensorError: the weight is on the meta device.
    """
    transposed = _transposed(handler, where)
    weight = cast(torch.Tensor, getattr(module, handler.weight_name))
    check_materialised(weight, f"{where}'s weight", f"the {init} init was not done")
    if not weight.is_floating_point():
        raise TargetError(
            f"{where}: the {init} init needs a floating-point weight, got {weight.dtype} (a quantised layer?); "
            "initialise on the float weights and quantise the residual afterwards"
        )
    if "lora_base_weight" in module._buffers:  # lorakit.layers keeps it while adapters are merged
        raise TargetError(f"{where}: the {init} init needs the layer's own weight; unmerge its adapters first")
    if weight.dim() != 2 or r > min(weight.shape):
        raise TargetError(f"{where}: the {init} init needs r <= min(out, in) = {min(weight.shape)}, got r={r}")
    return transposed


def init_from_weight(module: nn.Module, handler: LayerHandler, adapter: LoraAdapter, init: str, where: str) -> Initial:
    """Fill ``adapter.A``/``adapter.B`` by PiSSA or OLoRA from ``module``'s weight and replace the
    weight by the residual ``W - s B0 A0`` (module docstring). Returns what :func:`record` keeps.

    Raises:
        The errors of :func:`check`.
    """
    r = adapter.r
    transposed = check(module, handler, r, init, where)
    weight = cast(torch.Tensor, getattr(module, handler.weight_name))
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    W = W.t() if transposed else W
    s = float(adapter.scaling)
    original = fingerprint(weight)
    A0, B0 = factorise(W, init, r, s)
    residual = W - s * (B0 @ A0)
    with torch.no_grad():
        adapter.A.copy_(A0)
        adapter.B.copy_(B0)
        weight.copy_(residual.t() if transposed else residual)
    return Initial(adapter.A.detach().clone(), adapter.B.detach().clone(), original, fingerprint(weight))


def record(model: nn.Module, name: str, initials: dict[str, Initial] | None) -> None:
    """Keep (or, with ``None``, forget) adapter ``name``'s initial factors, per layer path
    (in the model's lorakit state, :attr:`lorakit.state.ModelState.initials`)."""
    if initials is not None:
        state.of(model).initials[name] = initials
    elif (found := state.peek(model)) is not None:
        found.initials.pop(name, None)


def recorded(model: nn.Module, name: str) -> dict[str, Initial] | None:
    """Adapter ``name``'s initial factors per layer path, if it was made by PiSSA/OLoRA in this process."""
    found = state.peek(model)
    return None if found is None else cast(dict[str, Initial] | None, found.initials.get(name))


def as_lora_on_original(
    initial: Initial, adapter: LoraAdapter, base_weight: torch.Tensor, rslora: bool, where: str
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Adapter ``adapter`` (trained from ``initial``) as an ordinary LoRA on the original weight:
    rank ``2r`` with ``A' = [A; A0]``, ``B' = [B, -B0]`` (PEFT's ``subtract_mutated_init``) and
    alpha doubled (times sqrt(2) with rsLoRA) so the scaling is unchanged. Returns it and the
    original weight's fingerprint.

    Raises:
        ConfigError: ``base_weight`` (the layer's weight without merged adapters) is no longer the
            residual the init left (another init or a load changed it since).
    """
    if not same_base(initial.residual, base_weight):
        raise ConfigError(
            f"{where}: the base weight is not the residual the PiSSA/OLoRA init left (it changed since), so "
            "the adapter cannot be written relative to the original weights"
        )
    A, B = adapter.A.detach(), adapter.B.detach()
    A2 = torch.cat([A, initial.A.to(A)], dim=0)
    B2 = torch.cat([B, -initial.B.to(B)], dim=1)
    alpha = adapter.alpha * (math.sqrt(2.0) if rslora else 2.0)
    out = LoraAdapter(
        tuple(A2.shape),
        tuple(B2.shape),
        r=2 * adapter.r,
        alpha=alpha,
        scaling=float(adapter.scaling),
        dropout=adapter.dropout,
        dtype=A.dtype,
        device=A.device,
    )
    with torch.no_grad():
        out.A.copy_(A2)
        out.B.copy_(B2)
    return out, initial.original
