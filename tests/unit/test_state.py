"""Per-model lorakit state has one home: one ModelState under one key of the model's __dict__."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit
from lorakit import state


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _adapted() -> nn.Sequential:
    model = _net()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"], train_modules=["2"], init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0", "2"], init="random"), "b")
    return model


def _lorakit_keys(model: nn.Module) -> list[str]:
    return [k for k in model.__dict__ if "lorakit" in k]


def test_everything_lorakit_keeps_about_a_model_is_one_object_under_one_key() -> None:
    model = _adapted()
    assert _lorakit_keys(model) == [state.ATTR]
    st = model.__dict__[state.ATTR]
    assert isinstance(st, state.ModelState)
    assert list(st.configs) == ["a", "b"] and list(st.owned) == ["2"]
    base = {n: True for n, _ in _net().named_parameters()}
    assert {n: g for n, g in st.requires_grad.items() if n in base} == base


@pytest.mark.parametrize("how", ["delete", "unload", "merge_and_unload"])
def test_removing_the_last_adapter_leaves_no_key(how: str) -> None:
    model = _adapted()
    if how == "delete":
        lorakit.delete_adapter(model, "a")
        assert _lorakit_keys(model) == [state.ATTR]  # "b" is still there
        lorakit.delete_adapter(model, "b")
    else:
        getattr(lorakit, how)(model)
    assert _lorakit_keys(model) == []
    assert state.peek(model) is None and state.configs(model) == {}


def test_a_model_sharing_anothers_state_object_switches_its_own_layers() -> None:
    # e.g. an attribute copy of every public __dict__ entry from one model to its twin
    model = _adapted()
    twin = copy.deepcopy(model)
    lorakit.set_adapter(model, "a")  # fills the cache in model's state
    twin.__dict__[state.ATTR] = model.__dict__[state.ATTR]
    lorakit.set_adapter(twin, "b")
    assert {layer.lora_active for _, layer in lorakit.lora_layers(twin)} == {("b",)}
    assert {layer.lora_active for _, layer in lorakit.lora_layers(model)} == {("a",)}


def test_a_model_pickled_with_the_old_keys_is_taken_over() -> None:
    # lorakit kept three keys in the model's __dict__ before ModelState; Ultralytics
    # checkpoints written then still hold them
    model = _adapted()
    lorakit.set_adapter(model, "a")
    x = torch.randn(5, 4)
    model.eval()
    want = model(x)
    st = model.__dict__.pop(state.ATTR)
    model.__dict__.update(lorakit_configs=st.configs, lorakit_requires_grad=st.requires_grad, lorakit_owned=st.owned)
    old = pickle.loads(pickle.dumps(model))
    assert torch.equal(old(x), want)
    assert lorakit.list_adapters(old) == ["a", "b"] and list(state.configs(old)) == ["a", "b"]
    assert _lorakit_keys(old) == [state.ATTR]
    lorakit.set_adapter(old, "b")  # "a"'s own copy of "2" goes back to the base's
    assert old[2] is state.owned_table(old)["2"].base
    lorakit.unload(old)
    assert _lorakit_keys(old) == []
