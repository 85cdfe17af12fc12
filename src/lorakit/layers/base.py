"""What every LoRA layer type shares: the adapted layer, its adapters, and the handler registry.

An adapted layer stays the *same object*: its class is swapped for a subclass
of its own class (``nn.Linear`` -> ``LoraLinear(LoraLayer, nn.Linear)``), so
``isinstance`` checks, the base parameter names (``weight``, ``bias``) and
references held by optimizers or other libraries all keep working::

        x ──────────► base layer (W, b, frozen) ──────────────┐
        │                                                     ▼
        └─► dropout ─► A (r x in) ─► * s ─► B (out x r) ─────► (+) ─► y

    y = W x + b + s * B A dropout(x),    s = alpha / r  (alpha / sqrt(r) for rsLoRA)

Adapters live in ``layer.lora[name]`` (:class:`LoraAdapter`: parameters ``A``,
``B`` and a ``scaling`` buffer, so Ultralytics' EMA and ``state_dict`` carry
it). Several adapters can be active; their deltas add up.

What differs per layer type sits in a :class:`LayerHandler`: the shapes of the two
factors, their init, the adapted forward and the delta for merging (the four a new type
must write), and, with defaults, the mixed-batch plan and forward, the file layout and
the rank's grouping. Adding a layer type is one handler and one :func:`register` call;
nothing else in lorakit changes (merging, mixed batches, files and combining ask the
handler). Lookup walks the layer's class hierarchy, so a subclass of
``nn.Linear`` uses the Linear handler unless it registers its own. The built-in handlers
each live in their own module: :mod:`lorakit.layers.linear` (with the fused training
node :mod:`lorakit.layers.fused_linear`), :mod:`lorakit.layers.conv` and
:mod:`lorakit.layers.embedding`.

Integrations register their own handlers when imported (``lorakit.hf`` registers
transformers' ``Conv1D``). :data:`LAZY` names the module to import when such a layer
is met, so a user never has to import it by hand.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MixedBatchError, TargetError
from ..variants import merged_weight, variant_forward
from .mixed_plan import Grid, MixedPlan

# "<module>.<qualname>" of a layer class -> lorakit module that registers its handler.
LAZY: dict[str, str] = {
    "transformers.pytorch_utils.Conv1D": "lorakit.hf",
    # bitsandbytes' quantised layers (lorakit.quant); without these, Linear4bit would get nn.Linear's handler
    "bitsandbytes.nn.modules.Linear4bit": "lorakit.quant",
    "bitsandbytes.nn.modules.Linear8bitLt": "lorakit.quant",
    "bitsandbytes.nn.modules.Embedding4bit": "lorakit.quant",
    "bitsandbytes.nn.modules.Embedding8bit": "lorakit.quant",
}


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

    def weight_shape(self, module: nn.Module) -> torch.Size:
        """The shape :meth:`delta_weight` returns: the base weight's (a quantised layer stores
        its weight packed, so it answers with the shape it computes with)."""
        return cast(torch.Tensor, getattr(module, self.weight_name)).shape

    def factor_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype new factors get: the weight's (a quantised layer's: its compute dtype)."""
        return cast(torch.dtype, getattr(module, self.weight_name).dtype)

    # False for a quantised base (lorakit.quant): merging into it in place would be lossy, so
    # lorakit.merge refuses it and merge_and_unload replaces the layer by merged_module's.
    merges_in_place: bool = True

    def merged_module(self, layer: LoraLayer, names: tuple[str, ...], requantize: bool) -> nn.Module:
        """A new plain layer computing ``layer``'s base with ``names`` merged (layers that do not
        merge in place)."""
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

    def rank_groups(self, module: nn.Module) -> int:
        """How many independent blocks the rank is split into (a grouped conv's groups; default 1).

        The rank is dim 0 of A and dim 1 of B, in ``rank_groups`` consecutive blocks of ``r/G``, block
        ``g`` belonging to group ``g``: padding ranks (:meth:`pad_rank`) and concatenating them
        (:func:`lorakit.combine_adapters`) keep each block in its group.
        """
        return 1

    def pad_rank(
        self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, A_out: torch.Tensor, B_out: torch.Tensor
    ) -> None:
        """Copy rank-``r`` factors into zero-filled rank-``r_max`` ones (``A_out``, ``B_out``), padding
        inside each of the :meth:`rank_groups` blocks."""
        g = self.rank_groups(module)
        r, r_out = A.shape[0], A_out.shape[0]
        A_out.view(g, r_out // g, *A.shape[1:])[:, : r // g] = A.reshape(g, r // g, *A.shape[1:])
        B_out[:, : r // g] = B

    # -- mixed batches (lorakit.mixed): the plan a layer reads, and the forward that reads it --

    def mixed_plan(
        self, module: LoraLayer, present: list[LoraAdapter | None], index: torch.Tensor, grid: Grid | None
    ) -> MixedPlan:
        """The plan :meth:`mixed_forward` reads, built once on entry to ``mixed_batch``.

        ``present[k]``: this layer's adapter for slot ``k`` (None where it lacks it); ``index``: the
        slot of each sample (``len(present)``: no adapter); ``grid``: the samples grouped by slot
        (:class:`~lorakit.layers.mixed_plan.Grid`, None for fewer than two adapters). Default: the
        factors stacked with an all-zero "no adapter" slot, ranks zero-padded to the largest
        (:meth:`pad_rank`), as Conv and Embedding read them.
        """
        weight = getattr(module, self.weight_name)
        r_max = max([ad.r for ad in present if ad is not None], default=0) or 1
        a_shape, b_shape = self.factor_shapes(module, r_max)
        A = torch.zeros((len(present) + 1, *a_shape), dtype=weight.dtype, device=weight.device)
        B = torch.zeros((len(present) + 1, *b_shape), dtype=weight.dtype, device=weight.device)
        s = torch.zeros(len(present) + 1, dtype=weight.dtype, device=weight.device)
        for k, ad in enumerate(present):
            if ad is not None:
                self.pad_rank(module, ad.A, ad.B, A[k], B[k])
                s[k] = ad.scaling
        return MixedPlan(index=index.to(weight.device), A=A, B=B, scaling=s)

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        """Forward with one adapter per sample (see :mod:`lorakit.mixed`).

        Raises:
            MixedBatchError: this layer type has no per-sample forward (the default).
        """
        raise MixedBatchError(f"layer type {type(module).__name__} does not support mixed batches")

    # -- the file layout (PEFT's, lorakit.io_peft): keys and the stored form of each factor --
    # Key suffixes of A and B after ``base_model.model.<path>.`` (PEFT's names; Embedding has its own).
    file_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")

    def file_factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(A, B)`` as the file stores them for rank ``r`` (default: :meth:`factor_shapes`)."""
        return self.factor_shapes(module, r)

    def to_file(self, module: nn.Module, factor: str, t: torch.Tensor) -> torch.Tensor:
        """Factor ``factor`` (``"A"`` or ``"B"``) in the form the file stores (default: as it is)."""
        return t

    def from_file(self, module: nn.Module, factor: str, t: torch.Tensor, file: Path, key: str) -> torch.Tensor:
        """Inverse of :meth:`to_file` for the tensor ``key`` of ``file`` (default: as it is).

        Raises:
            AdapterFileError: the stored tensor has no form lorakit can hold (e.g. a dense grouped-conv A).
        """
        return t

    # Instance attributes the handler keeps on an adapted layer; unwrap removes them.
    layer_state: tuple[str, ...] = ()

    # -- DoRA (lorakit.variants): a handler supports it by setting dora_dim and the three hooks --
    # The weight dim that indexes output channels (DoRA's magnitude); None: no DoRA on this type.
    dora_dim: int | None = None
    # False for layer types whose LoRA branch takes no dropout (Embedding: token ids).
    branch_dropout: bool = True

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        """Shape of DoRA's magnitude (PEFT's ``lora_magnitude_vector``): one number per channel."""
        return (getattr(module, self.weight_name).shape[cast(int, self.dora_dim)],)

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base output without its bias, computed with ``weight``."""
        raise NotImplementedError

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The LoRA branch ``s B A x`` of ``ad``, scaled on the rank-wide side (no dropout: the caller
        applies it)."""
        raise NotImplementedError

    def add_bias(self, module: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus the base layer's bias (if it has one), broadcast over the output channels."""
        bias = getattr(module, "bias", None)
        return y if bias is None else y + bias


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


def handler_file_keys() -> frozenset[str]:
    """Every registered handler's A and B key suffixes (:attr:`LayerHandler.file_keys`)."""
    return frozenset(k for h in _HANDLERS.values() for k in h.file_keys)


def registered_types() -> list[str]:
    """Names of the layer types that currently have a handler."""
    return sorted(t.__name__ for t in _HANDLERS)


class LoraAdapter(nn.Module):
    """One adapter's factors on one layer.

    Attributes:
        A: first factor, shape per handler (Linear: ``(r, in)``).
        B: second factor, shape per handler (Linear: ``(out, r)``); zero at init.
        scaling: 0-d buffer holding ``s``. A buffer, not a float, so EMA copies,
            ``state_dict`` and ``.to()`` keep it with the factors.
        r, alpha, dropout: the values this adapter was built with.
        variant: ``"lora"`` or ``"dora"`` (:mod:`lorakit.variants`); a DoRA adapter also
            has the parameter ``magnitude``.
    """

    scaling: torch.Tensor
    magnitude: nn.Parameter

    def __init__(
        self,
        A_shape: tuple[int, ...],
        B_shape: tuple[int, ...],
        *,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device,
        variant: str = "lora",
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(A_shape, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(B_shape, dtype=dtype, device=device))
        self.register_buffer("scaling", torch.tensor(float(scaling), dtype=torch.float32, device=device))
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.variant = variant  # a name in lorakit.variants.VARIANTS (a name: pickles and copies as one)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the LoRA branch input only; the base layer sees the original ``x``."""
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def extra_repr(self) -> str:
        extra = "" if self.variant == "lora" else f", variant={self.variant}"
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}{extra}"


class LoraLayer(nn.Module):
    """Mixin for adapted layers. Concrete classes come from :func:`lora_class_for`.

    State (plain attributes, all picklable):
        lora: ``nn.ModuleDict`` name -> :class:`LoraAdapter`.
        lora_active: names of active adapters (may name adapters this layer lacks).
        lora_merged: names merged into the base weight, in merge order.
        lora_disabled: True inside :func:`lorakit.disabled`.
        _lora_live: the adapters the forward adds: active, present, not merged, not disabled.
        _lora_mixed: a per-sample plan inside :func:`lorakit.mixed_batch`, else None.
        _lora_plain: no live adapter is of another variant than plain LoRA (a class default
            of True, so layers pickled before variants existed load).
    """

    _lora_plain: bool = True

    _lora_base_cls: type[nn.Module]
    lora_handler: LayerHandler
    lora: nn.ModuleDict
    lora_active: tuple[str, ...]
    lora_merged: tuple[str, ...]
    lora_disabled: bool
    _lora_live: tuple[LoraAdapter, ...]
    _lora_mixed: MixedPlan | None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._lora_mixed is not None:
            return self.lora_handler.mixed_forward(self, x, self._lora_mixed)
        if not self._lora_live:
            return cast(torch.Tensor, self._lora_base_cls.forward(self, x, *args, **kwargs))
        if not self._lora_plain:
            return variant_forward(self, x)
        return self.lora_handler.forward(self, x)

    def lora_refresh(self) -> None:
        """Recompute ``_lora_live`` after any change of active/merged/disabled state."""
        # Written to __dict__ directly: nn.Module.__setattr__ is slow, and set_adapter
        # calls this for every layer on every switch.
        adapters = adapter_dict(self)
        self.__dict__["_lora_live"] = tuple(adapters[n] for n in self.lora_live_names())
        self.__dict__["_lora_plain"] = all_plain(self._lora_live)

    def lora_live_names(self) -> tuple[str, ...]:
        """Names of the adapters the forward adds (``_lora_live``'s): active, present, not merged,
        not disabled; what ``merge_and_unload`` with no names merges."""
        if self.lora_disabled:
            return ()
        adapters = adapter_dict(self)
        return tuple(n for n in self.lora_active if n in adapters and n not in self.lora_merged)

    def lora_delta(self, names: tuple[str, ...]) -> torch.Tensor:
        """``sum_i s_i * delta W_i`` over ``names``, in fp32, shaped like the base weight.

        Raises:
            ConfigError: one of ``names`` is a DoRA adapter, whose merge is not additive
                (:meth:`lora_merged_weight` merges any variant).
        """
        handler = self.lora_handler
        weight = getattr(self, handler.weight_name)
        total = torch.zeros(handler.weight_shape(self), dtype=torch.float32, device=weight.device)
        for n in names:
            ad = cast(LoraAdapter, self.lora[n])
            if ad.variant != "lora":
                raise ConfigError(
                    f"adapter {n!r} is a {ad.variant} adapter: its merge is not an added delta; merge it instead"
                )
            total += ad.scaling.float() * handler.delta_weight(self, ad.A.detach().float(), ad.B.detach().float())
        return total

    def lora_merged_weight(self, names: tuple[str, ...], start: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight with ``names`` merged in order into ``start`` (default: the pristine
        weight), each by its variant's rule (:mod:`lorakit.variants`; DoRA's norm is of the
        pristine weight plus its own delta, as in its unmerged forward)."""
        pristine = self._buffers.get("lora_base_weight")
        base = (pristine if pristine is not None else getattr(self, self.lora_handler.weight_name)).detach().float()
        adapters = [cast(LoraAdapter, self.lora[n]) for n in names]
        return merged_weight(self.lora_handler, self, adapters, base, base if start is None else start.float())

    def lora_set_merged(self, names: tuple[str, ...]) -> None:
        """Make the weight equal ``W0`` with ``names`` merged (:meth:`lora_merged_weight`),
        ``W0`` the pristine weight.

        The pristine weight is kept in the non-persistent buffer ``lora_base_weight``
        while anything is merged, so unmerging restores it bitwise (no subtraction
        drift) and ``state_dict`` shows only the merged weight.
        """
        handler = self.lora_handler
        weight = getattr(self, handler.weight_name)
        with torch.no_grad():
            if names:
                if "lora_base_weight" not in self._buffers:
                    self.register_buffer("lora_base_weight", weight.detach().clone(), persistent=False)
                weight.copy_(self.lora_merged_weight(names).to(weight.dtype))
            elif "lora_base_weight" in self._buffers:
                base = self._buffers.pop("lora_base_weight")
                assert base is not None
                weight.copy_(base)
        self.lora_merged = names
        self.lora_refresh()

    def extra_repr(self) -> str:
        base = self._lora_base_cls.extra_repr(self)
        return f"{base}, lora_active={list(self.lora_active)}, lora_merged={list(self.lora_merged)}"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Concrete LoRA classes are made at run time, so pickle cannot find them by
        # name; rebuild them from the base class instead. Ultralytics pickles and
        # deep-copies whole models, so this must work.
        return (_restore, (self._lora_base_cls,), cast(Any, self).__getstate__())


# A process-wide count of module-tree changes: torch's global registration hook bumps it
# whenever any module gets a submodule (setattr, add_module, set_submodule, Sequential/
# ModuleList/ModuleDict assignment), and wrap/unwrap bump it for the class swap. A cached
# list of a model's LoRA layers stamped with this count is current while the count is
# unchanged (see :func:`lorakit.state.cached_layers`). Installed on first use: one int increment per
# module registration in the process.
STRUCTURE = [0]
_hook: Any = None


def bump_structure(*_: object) -> None:
    """Mark every cached LoRA-layer list stale (also the global module-registration hook)."""
    STRUCTURE[0] += 1


def watch_structure() -> None:
    """Install the global module-registration hook that keeps layer caches honest (once)."""
    global _hook
    if _hook is None:
        _hook = torch.nn.modules.module.register_module_module_registration_hook(bump_structure)
        bump_structure()


def adapter_dict(layer: LoraLayer) -> dict[str, LoraAdapter]:
    """``layer.lora`` as its plain ``name -> adapter`` dict (skips nn.Module attribute lookups
    on hot paths such as switching adapters)."""
    return cast(dict[str, LoraAdapter], cast(nn.ModuleDict, layer._modules["lora"])._modules)


def all_plain(live: tuple[LoraAdapter, ...]) -> bool:
    """True when every adapter in ``live`` is plain LoRA (the handlers' own, fused, forward)."""
    return all(ad.variant == "lora" for ad in live)


def live_rank(layer: LoraLayer) -> int:
    """Total rank of the adapters ``layer``'s forward adds."""
    return sum(ad.r for ad in layer._lora_live)


_LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {}


def lora_class_for(base_cls: type[nn.Module]) -> type[LoraLayer]:
    """The LoRA subclass of ``base_cls`` (made once and cached)."""
    cls = _LORA_CLASSES.get(base_cls)
    if cls is None:
        handler = handler_for(base_cls)
        if handler is None:
            raise TargetError(f"no LoRA handler for layer type {base_cls.__qualname__}")
        # Class attributes, so the hot path skips the registry lookup.
        attrs = {"_lora_base_cls": base_cls, "lora_handler": handler, "__module__": __name__}
        cls = cast(type[LoraLayer], type(f"Lora{base_cls.__name__}", (LoraLayer, base_cls), attrs))
        _LORA_CLASSES[base_cls] = cls
    return cls


def _restore(base_cls: type[nn.Module]) -> LoraLayer:
    cls = lora_class_for(base_cls)
    return cls.__new__(cls)


def wrap(module: nn.Module) -> LoraLayer:
    """Turn ``module`` into a LoRA layer in place (no adapters yet) and return it."""
    if isinstance(module, LoraLayer):
        return module
    module.__class__ = lora_class_for(type(module))
    bump_structure()
    layer = cast(LoraLayer, module)
    layer.lora = nn.ModuleDict()
    layer.lora_active = ()
    layer.lora_merged = ()
    layer.lora_disabled = False
    layer._lora_live = ()
    layer._lora_mixed = None
    return layer


def unwrap(layer: LoraLayer) -> nn.Module:
    """Turn a LoRA layer back into its base class in place, dropping all adapters.

    Merged adapters stay in the weight (call ``lora_set_merged(())`` first to undo them).
    """
    layer._buffers.pop("lora_base_weight", None)
    del layer.lora
    for attr in (
        "lora_active",
        "lora_merged",
        "lora_disabled",
        "_lora_live",
        "_lora_plain",
        "_lora_mixed",
        *layer.lora_handler.layer_state,
    ):
        layer.__dict__.pop(attr, None)
    base_cls = layer._lora_base_cls
    module: nn.Module = layer
    module.__class__ = base_cls
    bump_structure()
    return module
