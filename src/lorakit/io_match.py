"""An adapter's files checked against a model, before the model changes.

:func:`match_files` works out where each file tensor goes (:class:`Slot`: a LoRA factor of an
adapted layer, or the adapter's own copy of a fully trained module or bias), and checks
keys, shapes, dtypes and the base-model fingerprint. :func:`lorakit.load_adapter` and
:func:`lorakit.hotswap_adapter` then copy the values; :func:`lorakit.save_adapter` uses
the same key names.
"""

from __future__ import annotations

import warnings
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from . import owned
from .config import LoraConfig
from .errors import LoraError, check_materialised
from .inject import select_targets
from .io_errors import (
    AdapterConfigError,
    AdapterFileError,
    BaseModelMismatchError,
    DtypeMismatchError,
    KeyMismatchError,
    ShapeMismatchError,
)
from .io_fingerprint import check_fingerprint, same_base
from .io_format import FLOAT_DTYPES, FLOATS, dtype_name, parse_json
from .io_peft import PREFIX, factor_keys, from_peft_config, variant_keys
from .io_read import AdapterFiles
from .layers import LayerHandler, LoraAdapter, LoraLayer
from .variants import variant_of


def base_weight(layer: nn.Module, weight_name: str) -> torch.Tensor:
    """The pristine base weight (``lora_base_weight`` while something is merged)."""
    buf = layer._buffers.get("lora_base_weight")
    return buf if buf is not None else cast(torch.Tensor, getattr(layer, weight_name))


def bias_key(path: str, adapted: Container[str]) -> str:
    """The PEFT key of the bias of the module at ``path`` (an adapted layer's sits in ``base_layer``)."""
    return PREFIX + ".".join(p for p in (path, "base_layer" if path in adapted else "", "bias") if p)


def module_key(path: str, key: str) -> str:
    """The PEFT key of state-dict entry ``key`` of the fully trained module at ``path``."""
    return PREFIX + (path + "." if path else "") + key


@dataclass
class Slot:
    """Where one file tensor goes: factor ``"A"``/``"B"`` (or a variant's tensor, e.g. ``"magnitude"``)
    of the adapter on ``layer`` (``module``, adapted by ``handler``, whose ``from_file`` turns a
    stored factor into lorakit's form: a grouped conv's A is stored dense), or, for a fully trained
    module or bias at path ``layer``, the adapter's own tensor ``owned`` (a state-dict key of its
    copy, or "bias")."""

    shape: tuple[int, ...]
    layer: str
    factor: str = ""
    owned: str = ""
    dtype: torch.dtype | None = None  # an owned tensor's dtype (None: a LoRA factor, any float)
    handler: LayerHandler | None = None  # set for the factors A and B
    module: nn.Module | None = None

    def target(self, model: nn.Module, name: str, layers: Mapping[str, LoraLayer]) -> torch.Tensor:
        """The tensor of adapter ``name`` in ``model`` this slot fills."""
        if self.owned:
            return owned.tensor_of(model, name, self.layer, self.owned)
        ad = cast(LoraAdapter, layers[self.layer].lora[name])
        return cast(torch.Tensor, getattr(ad, self.factor))

    def from_file(self, t: torch.Tensor, file: Path, key: str) -> torch.Tensor:
        """The file's tensor ``key`` in the form lorakit holds (the handler's ``from_file`` for a factor).

        Raises:
            AdapterFileError: the handler cannot hold the stored factor.
        """
        if self.handler is None or self.module is None:
            return t
        return self.handler.from_file(self.module, self.factor, t, file, key)


def _plan(
    model: nn.Module, cfg: LoraConfig, file: Path, modules: Mapping[str, nn.Module] | None = None
) -> tuple[dict[str, Slot], dict[str, str]]:
    """Every key the adapter needs -> its slot, worked out before anything changes; and
    the adapted paths -> their weight names."""
    try:
        found = select_targets(model, cfg)
        for p, module, handler in found:
            handler.check(module, cfg.rank_for(p), p or "<root>")
            variant_of(cfg.dora).check(handler, module, p or "<root>")
    except LoraError as exc:
        raise AdapterConfigError(file, f"the adapter does not fit this model: {exc}") from None
    slots: dict[str, Slot] = {}
    given = dict(modules or {})
    for p, module, handler in found:
        check_materialised(
            getattr(module, handler.weight_name), f"{p or '<root>'}'s weight", f"{file.parent} was not loaded"
        )
        a_shape, b_shape = handler.file_factor_shapes(module, cfg.rank_for(p))
        a_key, b_key = factor_keys(p, handler)
        slots[a_key] = Slot(a_shape, p, "A", handler=handler, module=module)
        slots[b_key] = Slot(b_shape, p, "B", handler=handler, module=module)
        for key, attr in variant_keys(p, variant_of(cfg.dora).name).items():
            slots[key] = Slot(handler.magnitude_shape(module), p, attr)
    # fully trained modules and biases go into the adapter's own copies (made by inject):
    # shapes from the base's objects, or from the copies the caller gives
    train = owned.train_paths(model, cfg.train_modules)
    for mpath in train:
        module = given.get(mpath) or cast(nn.Module, owned.base_object(model, mpath))
        for k, v in module.state_dict(keep_vars=True).items():
            check_materialised(v, f"{mpath}.{k}", f"{file.parent} was not loaded")
            slots[module_key(mpath, k)] = Slot(tuple(v.shape), mpath, owned=k, dtype=v.dtype)
    adapted = {p for p, _, _ in found}
    for mpath in owned.bias_paths(model, cfg.bias, adapted, train):
        b = cast(nn.Parameter, owned.base_object(model, mpath, "bias"))
        slots[bias_key(mpath, adapted)] = Slot(tuple(b.shape), mpath, owned="bias", dtype=b.dtype)
    return slots, {p: h.weight_name for p, _, h in found}


def _base_differs(file: Path, model: nn.Module, metadata: dict[str, str], found: dict[str, str]) -> list[str] | None:
    """Adapted paths whose base weight differs from the file's fingerprint; None when the file has none.

    ``found`` maps each adapted path to its handler's weight name.
    """
    raw = metadata.get("lorakit_base")
    if raw is None:
        return None
    saved = parse_json(file, raw.encode())
    if not isinstance(saved, dict):
        raise AdapterFileError(file, "metadata lorakit_base is not a JSON object")
    differ = []
    for p, weight_name in found.items():
        fp = saved.get(p)
        if fp is None or not same_base(
            check_fingerprint(file, p, fp), base_weight(model.get_submodule(p), weight_name)
        ):
            differ.append(p)
    return differ


@dataclass(frozen=True)
class Match:
    """An adapter file checked against a model: where each tensor goes (``slots``), the
    adapted paths -> weight names (``paths``), the values to copy (``factors``, in
    lorakit's layout), and what did not match."""

    cfg: LoraConfig
    unknown: list[str]
    slots: dict[str, Slot]
    paths: dict[str, str]
    factors: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    differ: list[str] | None


def match_files(
    model: nn.Module,
    files: AdapterFiles,
    *,
    strict: bool,
    allow_other_base: bool,
    modules: Mapping[str, nn.Module] | None = None,
) -> Match:
    """Check ``files`` against ``model`` without changing it (the checks of :func:`load_adapter`)."""
    cfg_file, weights, tensors = files.config_file, files.weights_file, files.tensors
    cfg, unknown = from_peft_config(cfg_file, files.raw_config, strict, fingerprinted="lorakit_base" in files.metadata)
    slots, paths = _plan(model, cfg, cfg_file, modules)

    missing = sorted(set(slots) - set(tensors))
    unexpected = sorted(set(tensors) - set(slots))
    if len(missing) == len(slots):
        raise KeyMismatchError(weights, missing, unexpected, "no tensor in the file matches the model")
    if strict and (missing or unexpected):
        raise KeyMismatchError(weights, missing, unexpected, "strict=False loads the matching keys and reports these")
    for key, slot in slots.items():
        if key in tensors and tuple(tensors[key].shape) != slot.shape:
            actual = tuple(tensors[key].shape)
            hint = ""
            if slot.factor == "A" and actual[1:] == slot.shape[1:]:
                hint = f"the config gives {slot.layer} rank {slot.shape[0]}, the tensor has rank {actual[0]}"
            raise ShapeMismatchError(weights, key, slot.shape, actual, hint)
    _check_dtypes(weights, slots, tensors)
    factors = {k: s.from_file(tensors[k], weights, k) for k, s in slots.items() if k in tensors}

    differ = _base_differs(weights, model, files.metadata, paths)
    if differ:
        if not allow_other_base:
            raise BaseModelMismatchError(weights, differ)
        warnings.warn(str(BaseModelMismatchError(weights, differ)), stacklevel=3)
    return Match(cfg, unknown, slots, paths, factors, missing, unexpected, differ)


def _check_dtypes(weights: Path, slots: dict[str, Slot], tensors: dict[str, torch.Tensor]) -> None:
    """A tensor copied into a floating model tensor (or a LoRA factor) must be floating point
    (it is cast to the model's dtype); one copied into a non-floating model tensor (BatchNorm's
    int64 ``num_batches_tracked``) must have exactly its dtype: a cast could wrap or truncate."""
    for key, slot in slots.items():
        t = tensors.get(key)
        if t is None:
            continue
        want = slot.dtype
        if want is None or want.is_floating_point:
            if t.dtype not in FLOAT_DTYPES.values():
                raise DtypeMismatchError(weights, key, FLOATS, dtype_name(t.dtype), "the model's tensor is floating")
        elif t.dtype != want:
            raise DtypeMismatchError(weights, key, dtype_name(want), dtype_name(t.dtype), "the model's tensor has it")
