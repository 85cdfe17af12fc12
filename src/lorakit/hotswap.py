"""Hot-swap: replace the weights of a loaded adapter in place, from a file.

Serving many adapters from one base often means "same slot, new weights": a
compiled model, an optimizer or a server holds references to the adapter's
parameters, and re-injecting would break them. :func:`hotswap_adapter` reads an
adapter folder with exactly the checks of :func:`lorakit.load_adapter` and
writes its values into the existing ``A``/``B`` Parameters and ``scaling``
buffer of adapter ``name``. Base weights are never written.

Ranks. Per layer, with ``r`` the rank in the file and ``R`` the rank the
adapter has now::

    r == R   copy_ into A and B                          same objects, same shapes
    r <  R   zero A and B, copy the file's factors into  same objects, same shapes
             the first r rank rows (within each group for grouped convs);
             zero rows and columns add nothing:  [B 0] [A; 0] = B A
    r >  R   the tensors must grow: torch.utils.swap_tensors gives the existing
             Parameter objects the new shape (identity kept, but optimizer state
             for them and compiled graphs are stale, and .grad is cleared)

So a compiled model stays valid (no recompilation) as long as no file has a
larger rank than the adapter; :func:`prepare_hotswap` pads an adapter to a
maximum rank once, before compiling or building the optimizer. A padded
adapter keeps ``r`` = its tensor rank and an ``alpha`` chosen so the scaling is
the file's (``alpha * R / r``, or ``alpha * sqrt(R / r)`` with rsLoRA): saving it
writes an equivalent rank-``R`` file.

Coverage. A layer of adapter ``name`` that the file does not target, or (with
``strict=False``) whose factor is missing from the file, is set to zero (delta
0, as a fresh load that does not adapt it). A file that targets a layer the
adapter does not cover, or has tensors nothing uses, is refused: hot-swapping
never adds layers. Tensors the file carries for ``train_modules`` or biases are
copied into the adapter's own copies of them, as :func:`lorakit.load_adapter` does;
a file that trains a module or bias the adapter does not is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import owned, state
from .adapters import list_adapters
from .errors import AdapterNotFoundError, ConfigError
from .io_errors import AdapterConfigError, AdapterFileError, KeyMismatchError, NonFiniteTensorError
from .io_match import match_files
from .io_peft import factor_keys
from .io_read import AdapterFiles, read_adapter_files
from .layers import LoraAdapter, LoraLayer
from .state import lora_layers


@dataclass(frozen=True)
class HotswapReport:
    """What :func:`hotswap_adapter` did, by layer path.

    ``layers``: factors taken from the file; of those, ``padded`` were zero-padded to the
    adapter's larger rank (same tensors) and ``grown`` got larger tensors. ``zeroed``:
    layers of the adapter the file does not cover (or lacks a factor for, listed in
    ``missing``); their delta is now 0.
    """

    adapter: str
    path: Path | None
    layers: tuple[str, ...]
    padded: tuple[str, ...] = ()
    grown: tuple[str, ...] = ()
    zeroed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


def _from_state(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> AdapterFiles:
    where = Path("<state_dict>")
    if config is None:
        raise ConfigError("hotswap_adapter: a state dict needs config= (the adapter_config.json dict)")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise AdapterFileError(where, f"expected str -> tensor entries, got {k!r}: {type(v).__name__}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteTensorError(where, f"tensor {k!r} holds NaN or Inf values")
        tensors[k] = v.detach().to("cpu")
    return AdapterFiles(where, where, dict(config), tensors, {})


def _grow(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the shape and values of ``value``, keeping the Parameter object."""
    new = nn.Parameter(value.to(param.dtype, copy=True), requires_grad=param.requires_grad)
    param.grad = None
    try:
        torch.utils.swap_tensors(param, new)  # type: ignore[no-untyped-call]
    except RuntimeError:  # e.g. weak references held by a compiled graph's guards
        param.data = new.data


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    """The alpha that gives ``scaling`` at rank ``r``."""
    return scaling * (math.sqrt(r) if rslora else r)


def hotswap_adapter(
    model: nn.Module,
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    name: str = "default",
    *,
    config: Mapping[str, Any] | None = None,
    strict: bool = True,
    allow_other_base: bool = False,
    allow_pickle: bool = False,
) -> HotswapReport:
    """Replace the weights of loaded adapter ``name`` with those of an adapter file, in place.

    Afterwards the model computes exactly what a fresh :func:`lorakit.load_adapter` of the
    file would (rank and coverage rules in the module docstring). Nothing is re-injected;
    the active adapters, merged state (a merged ``name`` is re-merged from the pristine
    weights), ``requires_grad`` flags and Parameter objects are kept; ``scaling``, ``r``,
    ``alpha`` and ``dropout`` follow the file, and the model's stored config for ``name``
    becomes the file's (so :func:`lorakit.save_adapter` writes it).

    Args:
        path_or_state: an adapter folder (or its weights file), or a state dict with
            PEFT key names (``base_model.model.<path>.lora_A.weight``, ...) plus ``config``.
        name: the adapter to overwrite; it must exist.
        config: the ``adapter_config.json`` dict, only with a state dict.
        strict: as in :func:`lorakit.load_adapter`, but only for *missing* keys and unknown
            config keys: with ``strict=False`` a layer missing a factor is zeroed.
            Unexpected keys always raise.
        allow_other_base, allow_pickle: as in :func:`lorakit.load_adapter`.

    Returns:
        :class:`HotswapReport`.

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
        AdapterConfigError: the file targets layers adapter ``name`` does not cover.
        KeyMismatchError: tensors nothing uses (always) or missing keys (``strict``).
        Everything :func:`lorakit.load_adapter` raises for a bad file. The model is
        unchanged when anything is raised.
    """
    own = {p: layer for p, layer in lora_layers(model) if name in layer.lora}
    if not own:
        raise AdapterNotFoundError(f"cannot hot-swap adapter {name!r}: the model has {list_adapters(model)}")
    if isinstance(path_or_state, Mapping):
        files, where = _from_state(path_or_state, config), None
    else:
        files, where = read_adapter_files(path_or_state, allow_pickle=allow_pickle), Path(path_or_state)
    m = match_files(model, files, strict=strict, allow_other_base=allow_other_base)
    if m.unexpected:
        raise KeyMismatchError(
            files.weights_file, [], m.unexpected, f"hot-swapping adapter {name!r} cannot add tensors"
        )
    outside = sorted(set(m.paths) - set(own))
    if outside:
        raise AdapterConfigError(
            files.config_file,
            f"targets {outside}, which adapter {name!r} does not adapt; hot-swapping never adds layers "
            "(load_adapter the file as a new adapter instead)",
        )
    cfg = m.cfg
    dora = [p for p, layer in own.items() if cast(LoraAdapter, layer.lora[name]).variant != "lora"]
    if cfg.dora or dora:
        raise AdapterConfigError(
            files.config_file,
            f"hot-swapping DoRA adapters is not implemented (file use_dora={cfg.dora}, adapter {name!r} DoRA on "
            f"{len(dora)} layers); load_adapter the file as a new adapter instead",
        )
    mine = {e.name for e in owned.owned_by(model, name)}
    strange = sorted({s.layer for k, s in m.slots.items() if k in m.factors and s.owned} - mine)
    if strange:
        raise AdapterConfigError(
            files.config_file,
            f"trains {strange} fully, which adapter {name!r} does not; hot-swapping never adds trained modules "
            "(load_adapter the file as a new adapter instead)",
        )
    layer_map = dict(own)
    in_place = [
        (t, t.detach().clone())
        for t in (s.target(model, name, layer_map) for k, s in m.slots.items() if k in m.factors and s.owned)
    ]

    # -- plan every layer before changing anything ----------------------------------------
    swaps: list[tuple[str, LoraLayer, torch.Tensor, torch.Tensor, int]] = []
    zeroed: list[str] = []
    for p, layer in own.items():
        a_key, b_key = factor_keys(p, layer.lora_handler)
        if p in m.paths and a_key in m.factors and b_key in m.factors:
            swaps.append((p, layer, m.factors[a_key], m.factors[b_key], cfg.rank_for(p)))
        else:
            zeroed.append(p)

    adapters = {p: cast(LoraAdapter, layer.lora[name]) for p, layer in own.items()}
    backup = {
        p: (ad.A, ad.B, ad.A.detach().clone(), ad.B.detach().clone(), ad.scaling.clone(), ad.r, ad.alpha, ad.dropout)
        for p, ad in adapters.items()
    }
    configs = state.of(model).configs
    old_cfg = configs.get(name)
    padded: list[str] = []
    grown: list[str] = []
    try:
        with torch.no_grad():
            for p, layer, A, B, r in swaps:
                ad = adapters[p]
                have = ad.A.shape[0]
                if r == have:
                    ad.A.copy_(A)
                    ad.B.copy_(B)
                elif r < have:
                    ad.A.zero_()
                    ad.B.zero_()
                    layer.lora_handler.pad_rank(layer, A.to(ad.A.dtype), B.to(ad.B.dtype), ad.A, ad.B)
                    padded.append(p)
                else:
                    _grow(ad.A, A)
                    _grow(ad.B, B)
                    grown.append(p)
                rank = ad.A.shape[0]
                ad.scaling.fill_(cfg.scaling_for(p))
                ad.alpha = cfg.alpha_for(p) if rank == r else _alpha_for(cfg.scaling_for(p), rank, cfg.use_rslora)
                ad.r = rank
                ad.dropout = cfg.dropout
            for p in zeroed:
                ad = adapters[p]
                ad.A.zero_()
                ad.B.zero_()
                ad.alpha = _alpha_for(float(ad.scaling), ad.r, cfg.use_rslora)
                ad.dropout = cfg.dropout
            for key, value in m.factors.items():
                if m.slots[key].owned:
                    m.slots[key].target(model, name, layer_map).copy_(value)
        configs[name] = cfg
        for layer in own.values():
            if name in layer.lora_merged:
                layer.lora_set_merged(layer.lora_merged)
    except BaseException:
        _restore(adapters, backup, in_place)
        if old_cfg is not None:
            configs[name] = old_cfg
        for layer in own.values():
            if name in layer.lora_merged:
                layer.lora_set_merged(layer.lora_merged)
        raise
    return HotswapReport(
        adapter=name,
        path=where,
        layers=tuple(p for p, *_ in swaps),
        padded=tuple(padded),
        grown=tuple(grown),
        zeroed=tuple(zeroed),
        missing=tuple(m.missing),
    )


def _restore(
    adapters: dict[str, LoraAdapter],
    backup: dict[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor, int, float, float]],
    in_place: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    with torch.no_grad():
        for p, ad in adapters.items():
            A_obj, B_obj, A, B, scaling, r, alpha, dropout = backup[p]
            for param, value in ((A_obj, A), (B_obj, B)):
                if param.shape != value.shape:
                    _grow(param, value)
                else:
                    param.copy_(value)
            ad.scaling.copy_(scaling)
            ad.r, ad.alpha, ad.dropout = r, alpha, dropout
        for t, old in in_place:
            t.copy_(old)


def prepare_hotswap(model: nn.Module, name: str, r: int) -> tuple[str, ...]:
    """Zero-pad every layer of adapter ``name`` to rank ``r`` (at least), outputs unchanged.

    Call it once before ``torch.compile`` or building the optimizer: afterwards
    :func:`hotswap_adapter` copies any file of rank ``<= r`` into the same tensors.
    Layers already at rank ``>= r`` are left alone. ``scaling`` is kept; ``alpha`` is
    adjusted so that ``scaling`` still follows from ``r`` and ``alpha``.

    Returns:
        The paths of the layers that were padded.

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
        TargetError: ``r`` does not fit a layer (e.g. ``r % groups != 0`` on a grouped conv).
    """
    own = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    if not own:
        raise AdapterNotFoundError(f"cannot prepare adapter {name!r}: the model has {list_adapters(model)}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"prepare_hotswap: r must be an int > 0, got {r!r}")
    todo = [(p, layer) for p, layer in own if cast(LoraAdapter, layer.lora[name]).A.shape[0] < r]
    for p, layer in todo:
        layer.lora_handler.check(layer, r, p or "<root>")
    cfg = state.configs(model).get(name)
    rslora = bool(getattr(cfg, "use_rslora", False))
    with torch.no_grad():
        for _, layer in todo:
            ad = cast(LoraAdapter, layer.lora[name])
            a_shape, b_shape = layer.lora_handler.factor_shapes(layer, r)
            A = ad.A.new_zeros(a_shape)
            B = ad.B.new_zeros(b_shape)
            layer.lora_handler.pad_rank(layer, ad.A.detach(), ad.B.detach(), A, B)
            _grow(ad.A, A)
            _grow(ad.B, B)
            ad.r = r
            ad.alpha = _alpha_for(float(ad.scaling), r, rslora)
    return tuple(p for p, _ in todo)
