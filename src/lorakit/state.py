"""The one home of per-model lorakit state, and the lookups of a model's LoRA layers.

Everything lorakit remembers about a model (as opposed to a layer, whose adapters sit on
the layer itself) is one :class:`ModelState` in the model's ``__dict__`` under
:data:`ATTR`: the adapters' configs, the ``requires_grad`` the base had before the first
:func:`lorakit.inject`, the fully trained copies (:mod:`lorakit.owned`), and a cache of
the model's LoRA layers. It is pickled and deep-copied with the model (Ultralytics
checkpoints and EMA copies carry it), except the cache, which is rebuilt on first use;
it is dropped when the last adapter goes, so a merged model pickles without lorakit.

:func:`lora_layers` walks the module tree; :func:`cached_layers` keeps the walk's result
for the hot paths (switching adapters per request). The cache is stamped with
:data:`lorakit.layers.base.STRUCTURE`, which wrap/unwrap and torch's global
module-registration hook bump, so it is never used after any module tree changed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import LoraConfig
from .layers.base import STRUCTURE, LoraLayer, watch_structure

ATTR = "lorakit_state"

# The keys lorakit kept in a model's __dict__ before ModelState: models pickled then
# (e.g. Ultralytics checkpoints) are moved over on first use.
_LEGACY_CONFIGS, _LEGACY_GRADS, _LEGACY_OWNED = "lorakit_configs", "lorakit_requires_grad", "lorakit_owned"

Obj = nn.Module | nn.Parameter


@dataclass
class Owned:
    """One place whose object each owning adapter replaces with its own copy (see
    :mod:`lorakit.owned`).

    ``attr`` is ``""`` for the module at ``path``, or the name of a parameter of it
    (``"bias"``). ``base`` is the model's original object; ``copies`` maps adapter name
    to its copy.
    """

    path: str
    attr: str
    base: Obj
    copies: dict[str, Obj] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The place as a dotted path: ``"head"`` or ``"layers.0.bias"``."""
        return ".".join(p for p in (self.path, self.attr) if p)


@dataclass(eq=False)
class ModelState:
    """What lorakit keeps about one model.

    Attributes:
        configs: adapter name -> the :class:`LoraConfig` it was made with, in the order added.
        requires_grad: ``requires_grad`` of every parameter before the first inject, restored
            when the last adapter goes.
        owned: the places adapters train fully, by :attr:`Owned.name`.
        initials: adapter name -> layer path -> its factors and fingerprints at a PiSSA/OLoRA
            init (:class:`lorakit.init_svd.Initial`), for saving relative to the original base.
        layers: ``(STRUCTURE stamp, the model, its LoRA layers)``, or None; never pickled
            or copied. The model is held weakly (a strong reference would make a cycle that
            keeps a dropped model's memory until the garbage collector runs) and checked, so
            a model that shares another's state object (e.g. an attribute copy) never uses
            the other's layers.
    """

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    owned: dict[str, Owned] = field(default_factory=dict)
    initials: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: tuple[int, weakref.ref[nn.Module], list[LoraLayer]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy's layers are other objects, and a stamp means nothing in another process.
        return {**self.__dict__, "layers": None}


def peek(model: nn.Module) -> ModelState | None:
    """The model's state, or None when it has none (no adapter)."""
    found = model.__dict__.get(ATTR)
    if found is None and _LEGACY_CONFIGS in model.__dict__:
        return _adopt_legacy(model)
    return found


def of(model: nn.Module) -> ModelState:
    """The model's state, made empty the first time."""
    found = peek(model)
    if found is None:
        found = model.__dict__[ATTR] = ModelState()
    return found


def forget(model: nn.Module) -> ModelState | None:
    """Drop the model's state (the last adapter is gone) and return what it was."""
    found = peek(model)
    model.__dict__.pop(ATTR, None)
    return found


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Adapter name -> config (empty, and not stored, when the model has no state)."""
    found = peek(model)
    return found.configs if found is not None else {}


def owned_table(model: nn.Module) -> dict[str, Owned]:
    """The owned places by name (empty, and not stored, when the model has no state)."""
    found = peek(model)
    return found.owned if found is not None else {}


def _adopt_legacy(model: nn.Module) -> ModelState:
    d = model.__dict__
    found = d[ATTR] = ModelState(
        configs=d.pop(_LEGACY_CONFIGS), requires_grad=d.pop(_LEGACY_GRADS, {}), owned=d.pop(_LEGACY_OWNED, {})
    )
    return found


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(path, layer)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _fast_lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The LoRA layers of ``model`` (unordered, each once), by an iterative walk over
    ``_modules`` that does not descend into LoRA layers: several times faster than
    ``named_modules()`` on large models."""
    found: dict[int, LoraLayer] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, LoraLayer):
            found[id(m)] = m
            continue
        stack.extend(c for c in m._modules.values() if c is not None)
    return list(found.values())


def cached_layers(model: nn.Module) -> list[LoraLayer]:
    """:func:`_fast_lora_layers`, kept in the model's state until any module tree changes
    (a model without state, i.e. without adapters, is walked each time).

    (Only a raw ``del model.x`` goes unseen by the stamp: the removed layer then just keeps
    receiving switches, harmlessly.)
    """
    watch_structure()
    found = peek(model)
    if found is None:
        return _fast_lora_layers(model)
    cached = found.layers
    if cached is not None and cached[0] == STRUCTURE[0] and cached[1]() is model:
        return cached[2]
    layers = _fast_lora_layers(model)
    found.layers = (STRUCTURE[0], weakref.ref(model), layers)
    return layers
