"""LoRA variants: what differs between plain LoRA and DoRA, on every layer type.

An adapter's ``variant`` (a name in :data:`VARIANTS`) decides four things:

* its extra parameters (:meth:`Variant.init`; DoRA: the magnitude vector ``m``);
* its forward (plain adapters go through the handler's own, fused, forward; a layer
  with any DoRA adapter live goes through :func:`variant_forward`);
* its merge rule (:attr:`Variant.additive`, :meth:`Variant.merge`; plain: additive, DoRA: not);
* its extra file tensors (:attr:`Variant.file_keys`: PEFT key suffix -> adapter attribute).

DoRA (Liu et al. 2024), as PEFT computes it, so that PEFT is an exact oracle::

    W' = m * (W + s B A) / ||W + s B A||_c      (||.||_c: the norm of each output channel)
    y  = b + (m / n) * (W x + s B A x),         n = ||W + s (B A).detach()||_c, detached

``n`` is a constant for autograd (the paper's section 4.3), ``m`` starts at
``||W + s B A||_c`` so the output starts equal to plain LoRA's. With dropout ``d`` active
(training), PEFT applies the magnitude to the dropped input's base term:
``y = W x + b + (m/n - 1) W d(x) + (m/n) s B A d(x)``, which lorakit evaluates as
``W x + b + (m/n) (W d(x) + s B A d(x)) - W d(x)``: one out-wide tensor kept for the
magnitude's gradient per layer, where PEFT's form keeps two. With several live adapters each
DoRA one acts on the running output, in order, as PEFT's. The channel axis is the
handler's (:attr:`~lorakit.layer_base.LayerHandler.dora_dim`): the output rows for
Linear and Conv (norm over ``in/G x k``), the embedding dimension for Embedding (PEFT's
convention: the norm runs over the vocabulary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .errors import TargetError

if TYPE_CHECKING:
    from .layer_base import LayerHandler, LoraAdapter, LoraLayer


class Variant:
    """Plain LoRA: no extra parameters, additive merge, the handler's own forward."""

    name = "lora"
    file_keys: dict[str, str] = {}
    additive = True  # merging adds s * delta W (summed with its neighbours' first, as lorakit always has)

    def check(self, handler: LayerHandler, module: nn.Module, name: str) -> None:
        """Raise :class:`~lorakit.errors.TargetError` if this variant cannot work on ``module``."""

    def init(self, handler: LayerHandler, module: nn.Module, ad: LoraAdapter) -> None:
        """Add the variant's parameters to ``ad`` (after its factors are initialised)."""

    def merge(
        self, handler: LayerHandler, module: nn.Module, ad: LoraAdapter, weight: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor:
        """The fp32 weight after merging ``ad`` into ``weight``; ``base`` is the pristine weight (fp32)."""
        return weight + ad.scaling.float() * delta(handler, module, ad)


def delta(handler: LayerHandler, module: nn.Module, ad: LoraAdapter) -> torch.Tensor:
    """``B A`` of ``ad`` shaped like the base weight, fp32, outside any graph."""
    return handler.delta_weight(module, ad.A.detach().float(), ad.B.detach().float())


def _channel_norm(handler: LayerHandler, weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output channel (``dora_dim``) of ``weight``, as a flat vector."""
    dims = [d for d in range(weight.dim()) if d != handler.dora_dim]
    return cast(torch.Tensor, torch.linalg.vector_norm(weight, dim=dims))


def _on_weight(handler: LayerHandler, v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against the weight."""
    shape = [1] * ndim
    shape[cast(int, handler.dora_dim)] = -1
    return v.reshape(shape)


class Dora(Variant):
    """DoRA (module docstring). Extra parameter ``ad.magnitude``, shaped as PEFT's
    ``lora_magnitude_vector`` (Linear, Embedding: ``(C,)``; Conv: ``(1, out, 1, ...)``)."""

    name = "dora"
    file_keys = {"lora_magnitude_vector": "magnitude"}
    additive = False

    def check(self, handler: LayerHandler, module: nn.Module, name: str) -> None:
        if handler.dora_dim is None:
            raise TargetError(
                f"{name}: DoRA is not implemented for layer type {type(module).__name__} "
                f"({type(handler).__name__}); adapt it with plain LoRA (a separate config) or exclude it"
            )
        groups = getattr(module, "groups", 1)
        if isinstance(module, nn.modules.conv._ConvNd) and groups != 1:
            raise TargetError(
                f"{name}: DoRA on a grouped {type(module).__name__} (groups={groups}) is refused: PEFT's DoRA takes "
                "a grouped conv's norm from its B reshaped as if the conv were dense (not the delta its forward "
                "adds), so no lorakit DoRA could match PEFT's files and outputs there; exclude it or use plain LoRA"
            )

    def init(self, handler: LayerHandler, module: nn.Module, ad: LoraAdapter) -> None:
        weight = getattr(module, handler.weight_name)
        with torch.no_grad():
            norm = norm_of(handler, module, ad, weight.detach())
        ad.magnitude = nn.Parameter(norm.reshape(handler.magnitude_shape(module)))

    def merge(
        self, handler: LayerHandler, module: nn.Module, ad: LoraAdapter, weight: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor:
        d = ad.scaling.float() * delta(handler, module, ad)
        # the norm of the pristine weight plus this delta: the one the unmerged forward divides by
        k = ad.magnitude.detach().float().reshape(-1) / _channel_norm(handler, base + d)
        return _on_weight(handler, k, weight.dim()) * (weight + d)


def norm_of(handler: LayerHandler, module: nn.Module, ad: LoraAdapter, base: torch.Tensor) -> torch.Tensor:
    """``||base + s B A||_c`` (flat, in ``base``'s dtype), with ``B A`` detached from the graph."""
    d = handler.delta_weight(module, ad.A.detach(), ad.B.detach()).to(base.dtype)
    return _channel_norm(handler, base + ad.scaling.to(base.dtype) * d)


PLAIN = Variant()
DORA = Dora()
VARIANTS: dict[str, Variant] = {v.name: v for v in (PLAIN, DORA)}


def merged_weight(
    handler: LayerHandler, module: nn.Module, adapters: list[LoraAdapter], base: torch.Tensor, start: torch.Tensor
) -> torch.Tensor:
    """``start`` (fp32) with ``adapters`` merged in order; ``base`` is the pristine weight (fp32).

    Runs of additive adapters are summed first and added once: plain LoRA merges exactly as
    before variants existed (``W0 + (0 + d1 + d2 ...)``), bitwise.
    """
    weight = start
    total: torch.Tensor | None = None
    for ad in adapters:
        v = VARIANTS[ad.variant]
        if v.additive:
            if total is None:
                total = torch.zeros_like(weight)
            total += ad.scaling.float() * delta(handler, module, ad)
            continue
        if total is not None:
            weight, total = weight + total, None
        weight = v.merge(handler, module, ad, weight, base)
    return weight if total is None else weight + total


def variant_of(dora: bool) -> Variant:
    """The variant a config asks for (``LoraConfig.dora``)."""
    return DORA if dora else PLAIN


def variant_forward(module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The forward of a layer with a DoRA adapter live (module docstring), PEFT's order and terms."""
    handler = module.lora_handler
    weight = getattr(module, handler.weight_name)
    buf = module._buffers.get("lora_base_weight")  # the norm is of the pristine weight, merged or not
    base = buf if buf is not None else weight
    dtype = x.dtype if x.is_floating_point() else weight.dtype  # token ids: the embedding's dtype
    y = handler.base_nobias(module, x, weight)
    for ad in module._lora_live:
        dropping = ad.dropout > 0 and ad.training and handler.branch_dropout
        xd = ad.drop(x) if dropping else x
        lora = handler.branch(module, ad, xd, ad.scaling.to(dtype))
        if ad.variant != "dora":
            y = y + lora
            continue
        n = norm_of(handler, module, ad, base.detach().to(dtype))
        k = ad.magnitude / n.reshape(ad.magnitude.shape)
        if not dropping:  # y holds W x (+ the adapters before): y' = k (y + s B A x)
            y = k * (y + lora)
            continue
        # PEFT's training form, y + (k - 1) W d(x) + k s B A d(x), written so that autograd keeps one
        # out-wide tensor (W d(x) + s B A d(x), for k's gradient) instead of PEFT's two
        base_d = handler.base_nobias(module, xd, weight)
        y = y + (k * (base_d + lora) - base_d)
    return handler.add_bias(module, y)
