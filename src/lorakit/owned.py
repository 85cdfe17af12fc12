"""What an adapter trains fully: its own copies of ``train_modules`` and biases.

LoRA leaves the base weights alone, but a config can also train whole modules
(``train_modules``, e.g. a new classifier head) and biases (``bias="all"`` or
``"lora_only"``). Writing those into the base in place would make every adapter
share one head and leave ``disabled()`` unequal to the base. So each adapter owns
a copy of each such module or bias (as PEFT's ``modules_to_save`` does), the base
keeps its originals, and the active adapter's copies are *installed* at the
original places by a pointer swap::

    model.classifier  ──►  base module        (no adapter active, or disabled())
                      ──►  copies["a"]        (adapter "a" active)
    layer.bias        ──►  base Parameter  /  copies["a"]  (a Parameter of its own)

Module paths and parameter names never change, so ``state_dict`` keys, optimizers
built after the switch, Ultralytics and transformers see an ordinary model. The
copies not installed live in the model's lorakit state (:mod:`lorakit.state`), outside
the module tree: they are pickled and deep-copied with the model but not moved by
``model.to()``; an installed object is moved to the device and dtype of the one it
replaces.

Rules, checked before anything changes: a trained module holds no LoRA layer, and
two owned places never nest (``head`` and ``head.fc``, or a module and a bias inside
it, owned by different adapters); two active adapters that own the same place cannot
be combined (there is only one module to run).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from . import state
from .config import PatternSet
from .errors import ConfigError
from .layer_base import LoraAdapter, LoraLayer
from .state import Obj, Owned

__all__ = [
    "OWNED_ATTR",
    "Obj",
    "Owned",
    "add",
    "base_object",
    "bias_paths",
    "drop",
    "entries",
    "every_module",
    "install",
    "live",
    "owned_by",
    "plan",
    "set_trainable",
    "tensor_of",
    "train_paths",
]

# The owned table lives in the model's lorakit state (:mod:`lorakit.state`); a model
# without that key holds no lorakit trace at all. Kept under its old name for old imports.
OWNED_ATTR = state.ATTR


def entries(model: nn.Module) -> dict[str, Owned]:
    """The model's owned places by :attr:`Owned.name` (empty when nothing is owned)."""
    return state.owned_table(model)


def train_paths(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Outermost module paths matching ``patterns`` (a matched module's children are inside its copy)."""
    wanted = PatternSet(patterns)  # a YOLO run trains ~120 modules of ~1,000: no pattern-by-path loop
    out: list[str] = []
    taken: set[str] = set()
    for path, _ in model.named_modules():
        parts = path.split(".")
        if wanted.matches(path) and not any(".".join(parts[:i]) in taken for i in range(1, len(parts) + 1)):
            out.append(path)
            taken.add(path)
    return out


def _inside(path: str, outer: str) -> bool:
    return path == outer or not outer or path.startswith(outer + ".")


def bias_paths(model: nn.Module, bias: str, adapted: Iterable[str], skip: Sequence[str]) -> list[str]:
    """Paths of the modules whose ``bias`` Parameter policy ``bias`` trains.

    ``"all"``: every module with a bias Parameter; ``"lora_only"``: the ``adapted``
    layers only; ``"none"``: nothing. Modules inside ``skip`` (the trained modules,
    whose copies already hold their biases) and LoRA factors are left out.
    """
    if bias == "none":
        return []
    adapted = set(adapted)
    out = []
    for path, module in model.named_modules():
        if isinstance(module, LoraAdapter) or any(_inside(path, s) for s in skip):
            continue
        if isinstance(module._parameters.get("bias"), nn.Parameter) and (bias == "all" or path in adapted):
            out.append(path)
    return out


def base_object(model: nn.Module, path: str, attr: str = "") -> Obj:
    """The base's own object at a place, even while an adapter's copy is installed there."""
    entry = entries(model).get(".".join(p for p in (path, attr) if p))
    if entry is not None:
        return entry.base
    module = model.get_submodule(path)
    return cast(nn.Parameter, module._parameters[attr]) if attr else module


def plan(
    model: nn.Module,
    name: str,
    modules: Sequence[str],
    biases: Sequence[str],
    given: Mapping[str, nn.Module] | None = None,
) -> list[tuple[str, str, Obj]]:
    """Adapter ``name``'s copies of ``modules`` and of the biases of ``biases``:
    ``(path, attr, copy)`` triples, made from the base's objects; nothing is installed.

    ``given`` supplies the copy for some module paths instead (e.g. a detector head
    resized for another class count).

    Raises:
        ConfigError: a trained module holds LoRA layers, or a place nests with one that
            another adapter owns (or with another of this adapter's places).
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(modules))
    if unknown:
        raise ConfigError(f"adapter {name!r}: modules given for {unknown}, which it does not train fully")
    wanted = [(p, "") for p in modules] + [(p, "bias") for p in biases]
    taken = entries(model)
    for path, attr in wanted:
        here = ".".join(p for p in (path, attr) if p)
        for other in taken.values():
            if other.name == here:
                continue
            if _inside(here, other.name) or _inside(other.name, here):
                raise ConfigError(
                    f"adapter {name!r} would own {here!r}, which nests with {other.name!r} owned by "
                    f"{sorted(other.copies)}; one adapter's trained module cannot hold another's"
                )
    out: list[tuple[str, str, Obj]] = []
    for path, attr in wanted:
        base = base_object(model, path, attr)
        if isinstance(base, nn.Parameter):
            out.append((path, attr, nn.Parameter(base.detach().clone(), requires_grad=False)))
            continue
        if any(isinstance(m, LoraLayer) for m in base.modules()):
            raise ConfigError(
                f"adapter {name!r}: train module {path or '<root>'!r} contains LoRA layers; a module is either "
                "adapted with LoRA or trained fully (exclude its layers from targets)"
            )
        mine = given.get(path)
        if mine is None:
            mine = copy.deepcopy(base)
        for p in mine.parameters():
            p.requires_grad_(False)
        out.append((path, "", mine))
    return out


def add(model: nn.Module, name: str, planned: Sequence[tuple[str, str, Obj]]) -> None:
    """Record adapter ``name``'s copies (from :func:`plan`); installs nothing."""
    table = state.of(model).owned
    for path, attr, obj in planned:
        key = ".".join(p for p in (path, attr) if p)
        if key not in table:
            table[key] = Owned(path, attr, base_object(model, path, attr))
        table[key].copies[name] = obj


def live(model: nn.Module, active: Sequence[str]) -> dict[str, Obj]:
    """The object each owned place should hold with adapters ``active`` (the base's where
    no active adapter owns it).

    Raises:
        ConfigError: two active adapters own the same place.
    """
    out: dict[str, Obj] = {}
    for key, entry in entries(model).items():
        owners = [n for n in active if n in entry.copies]
        if len(owners) > 1:
            raise ConfigError(
                f"adapters {owners} each train {key!r} fully; they cannot be active together (their LoRA deltas "
                "add up, but only one module can run)"
            )
        out[key] = entry.copies[owners[0]] if owners else entry.base
    return out


def install(model: nn.Module, objects: Mapping[str, Obj]) -> None:
    """Put ``objects`` (from :func:`live`) at their places; each is moved to the device and
    dtype of the object it replaces. Only the installed copies of active adapters train."""
    table = entries(model)
    for key, obj in objects.items():
        entry = table[key]
        if entry.attr:
            owner = model.get_submodule(entry.path)
            old = owner._parameters[entry.attr]
            if old is not obj:
                if old is not None and (obj.device, obj.dtype) != (old.device, old.dtype):
                    obj.data = obj.data.to(old.device, old.dtype)
                owner._parameters[entry.attr] = cast(nn.Parameter, obj)
        else:
            parent_path, _, leaf = entry.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            old_module = parent._modules[leaf]
            if old_module is not obj:
                ref = next(old_module.parameters(), None) if old_module is not None else None
                if ref is not None:
                    cast(nn.Module, obj).to(ref.device)
                parent._modules[leaf] = cast(nn.Module, obj)


def set_trainable(model: nn.Module, active: Sequence[str]) -> None:
    """``requires_grad`` on every copy: True for the ``active`` adapters', False otherwise."""
    for entry in entries(model).values():
        for n, obj in entry.copies.items():
            params = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())
            for p in params:
                p.requires_grad_(n in active)


def drop(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``'s copies (install the right objects first); places no adapter
    owns any more are forgotten too."""
    table = entries(model)
    for key in list(table):
        table[key].copies.pop(name, None)
        if not table[key].copies:
            del table[key]


def every_module(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` and of the owned objects not installed now (each once)."""
    seen: set[int] = set()
    roots: list[nn.Module] = [model]
    for entry in entries(model).values():
        roots += [o for o in (entry.base, *entry.copies.values()) if isinstance(o, nn.Module)]
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                yield m


def owned_by(model: nn.Module, name: str) -> list[Owned]:
    """The places adapter ``name`` owns, in the order they were added."""
    return [e for e in entries(model).values() if name in e.copies]


def tensor_of(model: nn.Module, name: str, path: str, key: str) -> torch.Tensor:
    """Adapter ``name``'s own tensor for ``path`` + ``key``: a state-dict key of its copy of
    the module at ``path``, or ``"bias"`` of the module at ``path`` when it owns that bias."""
    table = entries(model)
    entry = table.get(path)
    if entry is not None and not entry.attr:
        return cast(torch.Tensor, cast(nn.Module, entry.copies[name]).state_dict(keep_vars=True)[key])
    return cast(nn.Parameter, table[f"{path}.{key}" if path else key].copies[name])
