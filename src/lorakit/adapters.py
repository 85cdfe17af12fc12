"""Many adapters per model: list, activate, delete, disable, merge, unmerge, unload.

Every state change here is an explicit call; ``model.train()``/``model.eval()``
never merge or unmerge anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from . import owned, state
from .batchnorm import release_batchnorm
from .config import as_strings
from .errors import AdapterNotFoundError, ConfigError, MixedBatchError, NonFiniteError, check_materialised
from .layer_base import LoraAdapter, LoraLayer, adapter_dict, all_plain, unwrap
from .state import cached_layers, lora_layers


def list_adapters(model: nn.Module) -> list[str]:
    """Names of all adapters in ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora.keys()))
    return list(names)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the active adapters (empty if the model has none)."""
    for _, layer in lora_layers(model):
        return layer.lora_active
    return ()


def _as_names(names: object) -> tuple[str, ...]:
    """``names`` as a tuple: one string is one name (never split into characters).

    Raises:
        ConfigError: ``None``, a non-string entry, or a name given twice (its delta would
            count twice).
    """
    wanted = as_strings("adapter names", names, "adapter name")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"adapter names must be distinct, got {list(wanted)!r}")
    return wanted


def _names(model: nn.Module, names: str | Iterable[str], layers: list[LoraLayer] | None = None) -> tuple[str, ...]:
    wanted = _as_names(names)
    if layers is None:
        have = list_adapters(model)
    else:
        have = list(dict.fromkeys(n for layer in layers for n in adapter_dict(layer)))
    unknown = [n for n in wanted if n not in have]
    if unknown:
        raise AdapterNotFoundError(f"unknown adapter(s) {unknown}; the model has {have}")
    return wanted


def set_adapter(model: nn.Module, names: str | Iterable[str]) -> None:
    """Activate ``names`` (one name or several, whose deltas then add up).

    Switching is a pointer change on each LoRA layer: no weight is copied or
    touched. Active adapters get ``requires_grad=True``, the others ``False``.
    An empty list leaves every adapter inactive (the base model's outputs,
    unless something is merged).

    Adapters that train modules or biases fully (``train_modules``, ``bias``) have their
    own copies of those installed while active (:mod:`lorakit.owned`).

    Raises:
        AdapterNotFoundError: a name the model does not have.
        ConfigError: ``None``, a name given twice, or two adapters that each train the
            same module fully.
        MixedBatchError: called inside :func:`lorakit.mixed_batch`.
    """
    # A cached layer list and plain attribute writes: this is on the serving path
    # (switching per request), so it stays well under a millisecond.
    layers = cached_layers(model)
    active = _as_names(names)
    _not_mixing(layers, "set_adapter")
    dicts = [adapter_dict(layer) for layer in layers]
    # any() stops at the first layer that has the name: no full list of names per switch
    if any(not any(n in d for d in dicts) for n in active):
        _names(model, active, layers)  # raises, naming what the model has
    st = state.peek(model)
    objects = owned.live(model, active) if st is not None and st.owned else None  # may raise
    for layer, adapters in zip(layers, dicts, strict=True):
        d = layer.__dict__
        d["lora_active"] = active
        for key, adapter in adapters.items():
            flag = key in active
            for p in adapter._parameters.values():
                if p is not None and p.requires_grad != flag:
                    p.requires_grad = flag  # the property: about 1.4x faster than requires_grad_()
        if d["lora_disabled"]:
            d["_lora_live"] = ()
        else:  # lora_refresh(), inlined
            merged = d["lora_merged"]
            d["_lora_live"] = tuple(adapters[n] for n in active if n in adapters and n not in merged)
        d["_lora_plain"] = all_plain(d["_lora_live"])
    if objects is not None:
        if not _is_disabled(layers):  # disabled(): the base's stay until its exit
            owned.install(model, objects)
        owned.set_trainable(model, active)


def _not_mixing(layers: Iterable[LoraLayer], what: str) -> None:
    """Refuse a state change inside a :func:`lorakit.mixed_batch` block (every layer holds
    a plan there, so the first one tells)."""
    for layer in layers:
        if layer._lora_mixed is not None:
            raise MixedBatchError(f"{what} inside a mixed_batch block; leave the block first")
        return


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; a layer left with no adapter
    becomes its plain base class again (no trace left). If ``name`` was merged,
    it is taken out of the weight first (the other merged adapters stay merged).

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
        MixedBatchError: called inside :func:`lorakit.mixed_batch`.
    """
    _names(model, name)
    layers = cached_layers(model)
    _not_mixing(layers, "delete_adapter")
    remaining = tuple(n for n in active_adapters(model) if n != name)
    if owned.entries(model):
        owned.install(model, owned.live(model, () if _is_disabled(layers) else remaining))
        owned.drop(model, name)
    for _, layer in list(lora_layers(model)):
        if name not in layer.lora:
            continue
        if name in layer.lora_merged:
            layer.lora_set_merged(tuple(n for n in layer.lora_merged if n != name))
        del layer.lora[name]
        layer.lora_active = tuple(n for n in layer.lora_active if n != name)
        if len(layer.lora) == 0:
            layer.lora_set_merged(())
            unwrap(layer)
        else:
            layer.lora_refresh()
    configs = state.configs(model)
    configs.pop(name, None)
    if not configs:
        _forget(model)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly what the base model computes.

    Merged layers are restored to their pristine weights for the block (bitwise)
    and re-merged on exit, which recomputes the same merged weights bitwise; the
    base's own modules and biases replace the adapters' fully trained copies.
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.lora_merged for layer in layers]
    for layer in layers:
        layer.lora_disabled = True
        layer.lora_set_merged(())
    owned.install(model, owned.live(model, ()))
    try:
        yield model
    finally:
        for layer, names in zip(layers, merged, strict=True):
            layer.lora_disabled = False
            layer.lora_set_merged(names)
        owned.install(model, owned.live(model, active_adapters(model)))


def _is_disabled(layers: Iterable[LoraLayer]) -> bool:
    """Inside :func:`disabled` (every LoRA layer is marked then)."""
    return any(layer.lora_disabled for layer in layers)


def _check_finite(model: nn.Module, names: tuple[str, ...]) -> None:
    for path, layer in lora_layers(model):
        if any(n in layer.lora for n in names):
            check_materialised(getattr(layer, layer.lora_handler.weight_name), f"{path}'s weight", "nothing was merged")
        for n in names:
            if n in layer.lora:
                ad = cast(LoraAdapter, layer.lora[n])
                # every parameter (A, B and a variant's, e.g. DoRA's magnitude) and the scaling
                for pname, t in (*ad.named_parameters(), ("scaling", ad.scaling)):
                    check_materialised(t, f"{path}.lora.{n}.{pname}", "nothing was merged")
                    if not torch.isfinite(t).all():
                        raise NonFiniteError(
                            f"adapter {n!r} has non-finite values in {path}.lora.{n}.{pname}; nothing was merged"
                        )


def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Fold adapters into the base weights: ``W <- W0 + sum_i s_i * delta W_i``
    (a DoRA adapter in turn: ``W <- m * (W + s delta W) / ||W0 + s delta W||_c``, :mod:`lorakit.variants`).

    ``names`` defaults to the active adapters. The sum is computed in fp32 from
    the pristine weight ``W0`` and cast once to the weight's dtype. Afterwards
    the forward costs exactly the base model's; :func:`unmerge` restores ``W0``
    bitwise. Adapters already merged stay merged.

    Raises:
        AdapterNotFoundError: an unknown name.
        ConfigError: a name given twice.
        NonFiniteError: an adapter (or the merged weight) has NaN/Inf; raised
            before any weight changes.
        MetaTensorError: a weight or factor is on the meta device (nothing merged).
        MixedBatchError: called inside :func:`lorakit.mixed_batch`.
        ConfigError: a layer holding one of ``names`` has a quantised base (:mod:`lorakit.quant`);
            :func:`merge_and_unload` merges those.
    """
    wanted = active_adapters(model) if names is None else _names(model, names)
    _not_mixing(cached_layers(model), "merge")
    for path, layer in _not_in_place(model, wanted):
        raise ConfigError(
            f"{path or '<root>'} has a quantised base ({layer._lora_base_cls.__name__}): merging into it in place "
            "is lossy; lorakit.merge_and_unload(model) replaces it by a dense merged layer (requantize=True "
            "quantises that again), or load the adapter onto the unquantised base and merge there"
        )
    _merge(model, wanted)


def _not_in_place(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, LoraLayer]]:
    """The layers holding one of ``names`` whose handler cannot merge in place (a quantised base)."""
    return [
        (path, layer)
        for path, layer in lora_layers(model)
        if not layer.lora_handler.merges_in_place and any(n in layer.lora for n in names)
    ]


def _merge(model: nn.Module, wanted: tuple[str, ...]) -> None:
    """:func:`merge` of ``wanted`` into every layer that merges in place (the others are left alone)."""
    _check_finite(model, wanted)
    done: list[tuple[LoraLayer, tuple[str, ...]]] = []
    try:
        for path, layer in lora_layers(model):
            add = tuple(n for n in wanted if n in layer.lora and n not in layer.lora_merged)
            if not add or not layer.lora_handler.merges_in_place:
                continue
            before = layer.lora_merged
            layer.lora_set_merged(before + add)
            done.append((layer, before))
            weight = getattr(layer, layer.lora_handler.weight_name)
            if not torch.isfinite(weight).all():  # finite factors can still overflow a low-precision weight
                raise NonFiniteError(f"merging {list(add)} into {path} overflows {weight.dtype}; nothing was merged")
    except BaseException:
        for layer, before in reversed(done):
            layer.lora_set_merged(before)
        raise


def unmerge(model: nn.Module) -> None:
    """Restore every merged weight to its pristine value, bitwise."""
    _not_mixing(cached_layers(model), "unmerge")
    for _, layer in lora_layers(model):
        layer.lora_set_merged(())


def merge_and_unload(
    model: nn.Module, names: str | Iterable[str] | None = None, *, requantize: bool = False
) -> nn.Module:
    """Merge ``names`` (default: the active adapters) and remove every LoRA layer.

    Returns the same model object made only of its original layer classes, so it
    pickles, fuses, exports and loads without lorakit. The merged adapters' fully
    trained modules and biases stay in the model; adapters not merged are discarded.

    A layer with a quantised base (bitsandbytes' 4-bit/8-bit, :mod:`lorakit.quant`) is
    replaced: its weight is dequantised, the adapters are added in fp32, and the result
    becomes a dense ``nn.Linear`` in the adapters' dtype (a 4-bit layer's compute dtype,
    float32 for 8-bit) or, with ``requantize=True``, a new quantised layer of the same kind
    (lossy: one more rounding to the 4/8-bit grid).

    Raises:
        ConfigError: two of the adapters train the same module fully. The errors of
            :func:`merge`. Nothing is changed when anything is raised.
    """
    wanted = active_adapters(model) if names is None else _names(model, names)
    objects = owned.live(model, wanted)
    _not_mixing(cached_layers(model), "merge")
    # quantised bases: every replacement is built before anything changes (_merge checks every
    # adapter, theirs included, before it changes anything; the replacements go in after it)
    swaps = []
    for path, layer in _not_in_place(model, wanted):
        if not path:
            raise ConfigError(f"the model itself is a quantised {layer._lora_base_cls.__name__}: wrap it in a module")
        merged = tuple(n for n in wanted if n in layer.lora)
        swaps.append((path, layer.lora_handler.merged_module(layer, merged, requantize)))
    _merge(model, wanted)
    for path, new in swaps:
        model.set_submodule(path, new)
    owned.install(model, objects)
    for _, layer in list(lora_layers(model)):
        unwrap(layer)
    _forget(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model, with its pristine weights
    and its own modules and biases."""
    owned.install(model, owned.live(model, ()))
    for _, layer in list(lora_layers(model)):
        layer.lora_set_merged(())
        unwrap(layer)
    _forget(model)
    return model


def _forget(model: nn.Module) -> None:
    """Drop model-level lorakit state once no adapter is left: the base parameters get
    back the ``requires_grad`` they had before the first :func:`inject`, and BatchNorm
    follows ``train()``/``eval()`` again."""
    release_batchnorm(model)  # before the copies are forgotten: it unhooks them too
    gone = state.forget(model)
    grads = gone.requires_grad if gone is not None else {}
    for name, param in model.named_parameters():
        if name in grads:
            param.requires_grad_(grads[name])
