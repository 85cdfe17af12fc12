"""Layer type -> handler: how LoRA attaches to each kind of layer.

A handler knows, for one layer type, the shapes of the two LoRA factors, how
to initialise them, how to run the adapted forward, and how to turn the
factors into a weight delta for merging. Adding a layer type is one
:func:`register` call; nothing else in lorakit changes. Lookup walks the
layer's class hierarchy, so a subclass of ``nn.Linear`` uses the Linear
handler unless it registers its own.

Integrations register their own handlers when imported (``lorakit.hf``
registers transformers' ``Conv1D``). :data:`LAZY` names the module to import
when such a layer is met, so a user never has to import it by hand.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torch import nn

from .errors import MixedBatchError

if TYPE_CHECKING:
    import torch

    from .layers import LoraLayer
    from .mixed import MixedPlan

# "<module>.<qualname>" of a layer class -> lorakit module that registers its handler.
LAZY: dict[str, str] = {"transformers.pytorch_utils.Conv1D": "lorakit.hf"}


class LayerHandler:
    """How LoRA attaches to one layer type. Subclass and :func:`register` it.

    ``kind`` is ``"linear"`` for layers that ``targets="all-linear"`` selects.
    ``weight_name`` is the parameter that merging changes. ``fan_in_fan_out`` is
    True for layers storing their weight as (in, out) (transformers' ``Conv1D``):
    PEFT's config records it.
    """

    kind: str = "other"
    weight_name: str = "weight"
    fan_in_fan_out: bool = False

    def check(self, module: nn.Module, r: int, name: str) -> None:
        """Raise :class:`~lorakit.errors.TargetError` if rank ``r`` cannot work on ``module``."""

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(A, B)`` for rank ``r``."""
        raise NotImplementedError

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        """Fill ``A`` and ``B`` in place (``init`` is a :data:`lorakit.config.INITS` value)."""
        raise NotImplementedError

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        """Base output plus ``s * delta`` of every adapter in ``module._lora_live``."""
        raise NotImplementedError

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Unscaled ``delta W`` (shaped like the base weight) such that merging
        ``W + s * delta W`` gives the same outputs as the unmerged forward."""
        raise NotImplementedError

    def pad_rank(
        self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, A_out: torch.Tensor, B_out: torch.Tensor
    ) -> None:
        """Copy rank-``r`` factors into zero-filled rank-``r_max`` ones (``A_out``, ``B_out``).

        Default: the rank is dim 0 of A and dim 1 of B (Linear, Embedding).
        """
        r = A.shape[0]
        A_out[:r] = A
        B_out[:, :r] = B

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        """Forward with one adapter per sample (see :mod:`lorakit.mixed`)."""
        raise MixedBatchError(f"layer type {type(module).__name__} does not support mixed batches")


_HANDLERS: dict[type[nn.Module], LayerHandler] = {}


def register(layer_type: type[nn.Module], handler: LayerHandler) -> None:
    """Make ``layer_type`` (and its subclasses without a handler of their own) adaptable."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register: layer_type must be an nn.Module subclass, got {layer_type!r}")
    _HANDLERS[layer_type] = handler


def handler_for(module_or_type: nn.Module | type) -> LayerHandler | None:
    """The handler for a layer (or layer class), or ``None`` if lorakit cannot adapt it."""
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    for klass in cls.__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
        lazy = LAZY.get(f"{klass.__module__}.{klass.__qualname__}")
        if lazy is not None:
            importlib.import_module(lazy)
            if klass in _HANDLERS:
                return _HANDLERS[klass]
    return None


def registered_types() -> list[str]:
    """Names of the layer types that currently have a handler."""
    return sorted(t.__name__ for t in _HANDLERS)
