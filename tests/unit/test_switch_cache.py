"""set_adapter's cached layer list never goes stale when the module tree changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit
from lorakit.inject import lora_layers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def _inject_two(model: nn.Module) -> None:
    config = lorakit.LoraConfig(r=2, targets=("re:.*",), target_types=(nn.Linear,), init="random")
    for name in ("a", "b"):
        lorakit.inject(model, config, name)


def _active(model: nn.Module) -> set[tuple[str, tuple[str, ...]]]:
    return {(p, layer.lora_active) for p, layer in lora_layers(model)}


def test_a_replaced_submodule_is_switched_too() -> None:
    model = _net()
    _inject_two(model)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    _inject_two(fresh)
    lorakit.set_adapter(fresh, "a")
    lorakit.set_adapter(model, "a")  # fills the cache; nothing lorakit does happens after this
    model[2] = fresh  # a plain setattr on the parent: the cache must notice
    lorakit.set_adapter(model, "b")
    assert _active(model) == {(p, ("b",)) for p in ("0", "2.0", "2.1")}
    x = torch.randn(3, 4)
    y_b = model(x)
    lorakit.set_adapter(model, "a")
    assert not torch.equal(model(x), y_b)


def test_new_and_removed_layers_and_copies() -> None:
    model = _net()
    _inject_two(model)
    lorakit.set_adapter(model, "b")
    model.add_module("extra", nn.Linear(2, 2))
    lorakit.inject(model, lorakit.LoraConfig(r=1, targets=("extra",), init="random"), "c")
    lorakit.set_adapter(model, "c")
    assert dict(_active(model))["extra"] == ("c",)
    lorakit.delete_adapter(model, "c")  # "extra" is a plain Linear again
    with pytest.raises(lorakit.AdapterNotFoundError):
        lorakit.set_adapter(model, "c")
    lorakit.set_adapter(model, "a")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        lorakit.set_adapter(clone, "b")  # the copy's own layers, not the original's
        assert {a for _, a in _active(clone)} == {("b",)}
        assert {a for _, a in _active(model)} == {("a",)}
    lorakit.unload(model)
    with pytest.raises(lorakit.AdapterNotFoundError):
        lorakit.set_adapter(model, "a")


def test_the_cache_never_travels_with_the_model() -> None:
    model = _net()
    _inject_two(model)
    lorakit.set_adapter(model, "b")
    assert b"_layer_cache" not in pickle.dumps(model)
    plain = lorakit.merge_and_unload(model)
    assert b"lorakit" not in pickle.dumps(plain)  # a merged model pickles with no lorakit trace
