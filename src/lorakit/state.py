"""Per-model lorakit state, and the lookups of a model's LoRA layers.

:func:`lora_layers` walks the module tree; :func:`cached_layers` keeps the walk's result
per model for the hot paths (switching adapters per request), stamped so that it is
never used after the module tree changed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from torch import nn

from .layer_base import STRUCTURE, LoraLayer, watch_structure

CONFIGS_ATTR = "lorakit_configs"  # in the model's __dict__: adapter name -> its LoraConfig
GRADS_ATTR = "lorakit_requires_grad"  # requires_grad of every parameter before the first inject


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


# model -> (STRUCTURE stamp, its LoRA layers). Kept beside the model, not in its __dict__:
# nothing of it is pickled or deep-copied with the model (merged checkpoints stay plain).
_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[LoraLayer]]] = weakref.WeakKeyDictionary()


def cached_layers(model: nn.Module) -> list[LoraLayer]:
    """:func:`_fast_lora_layers`, cached per model until any module tree changes.

    The cache is stamped with :data:`lorakit.layer_base.STRUCTURE`, which torch's global
    module-registration hook and wrap/unwrap bump; so a stale list is never used, even
    after a user replaces a submodule. (Only a raw ``del model.x`` goes unseen: the
    removed layer then just keeps receiving switches, harmlessly.)
    """
    watch_structure()
    cached = _LAYER_CACHE.get(model)
    if cached is not None and cached[0] == STRUCTURE[0]:
        return cached[1]
    layers = _fast_lora_layers(model)
    _LAYER_CACHE[model] = (STRUCTURE[0], layers)
    return layers
