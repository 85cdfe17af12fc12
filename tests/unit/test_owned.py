"""Fully trained modules and biases belong to their adapter (issue 12, item 2).

Each adapter keeps its own copy of its ``train_modules`` and trained biases; the base
keeps its originals. Switching, ``disabled()``, deleting, saving, merging and mixed
batches must treat those copies exactly as they treat A and B.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit
from lorakit import owned

HEAD = "2"  # the classifier head of _base(): trained fully


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.BatchNorm1d(3)).eval()


def _cfg(**kw: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=4, targets=["0"], init="random", **kw)  # type: ignore[arg-type]


def _trained(seed: int, bias: str = "none") -> nn.Module:
    """The base with adapter "default" whose head (and biases) are set to values of its own."""
    model = _base()
    lorakit.inject(model, _cfg(train_modules=[HEAD], bias=bias))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> bool:
    """``state`` holds every tensor of ``base`` bitwise (its LoRA factors aside)."""
    return all(k in state and torch.equal(state[k], v) for k, v in base.items())


@pytest.fixture
def two(tmp_path):
    """A base with adapters "a" and "b" loaded from files, each with its own head and biases,
    and the models that wrote them."""
    ref_a, ref_b = _trained(1, bias="all"), _trained(2, bias="all")
    lorakit.save_adapter(ref_a, tmp_path / "a")
    lorakit.save_adapter(ref_b, tmp_path / "b")
    model = _base()
    pristine = _state(model)
    lorakit.load_adapter(model, tmp_path / "a", "a")
    lorakit.load_adapter(model, tmp_path / "b", "b")
    return model, pristine, ref_a, ref_b


def test_each_loaded_adapter_runs_with_its_own_head_and_biases(two) -> None:
    model, _, ref_a, ref_b = two
    x = torch.randn(5, 8)
    lorakit.set_adapter(model, "a")
    assert torch.equal(model(x), ref_a(x))
    lorakit.set_adapter(model, "b")
    assert torch.equal(model(x), ref_b(x))
    lorakit.set_adapter(model, "a")  # and back: b's load did not overwrite a's head
    assert torch.equal(model(x), ref_a(x))


def test_disabled_is_the_base_and_delete_leaves_no_trace(two) -> None:
    model, pristine, _, _ = two
    x = torch.randn(5, 8)
    base_out = _base()(x)
    lorakit.set_adapter(model, "b")
    with lorakit.disabled(model):
        assert torch.equal(model(x), base_out)
        assert _same(_state(model), pristine)
    lorakit.delete_adapter(model, "b")  # the active one: the base's head comes back
    assert torch.equal(model[2].weight, pristine["2.weight"]) and lorakit.active_adapters(model) == ()
    lorakit.delete_adapter(model, "a")
    assert _state(model).keys() == pristine.keys() and _same(_state(model), pristine)
    assert owned.OWNED_ATTR not in model.__dict__
    assert torch.equal(model(x), base_out)


def test_only_the_active_adapters_copies_train(two) -> None:
    model, _, _, _ = two
    lorakit.set_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"2.weight", "2.bias", "0.bias", "3.bias"} <= trainable and "3.weight" not in trainable
    b_head = owned.entries(model)[HEAD].copies["b"]
    assert not any(p.requires_grad for p in b_head.parameters())
    assert not any(p.requires_grad for p in owned.entries(model)[HEAD].base.parameters())


def test_save_writes_the_adapters_own_copies_whichever_is_active(two, tmp_path) -> None:
    model, _, _, ref_b = two
    lorakit.set_adapter(model, "a")
    lorakit.save_adapter(model, tmp_path / "b_again", "b")
    fresh = _base()
    lorakit.load_adapter(fresh, tmp_path / "b_again")
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), ref_b(x))


def test_merge_and_unload_keeps_the_merged_adapters_head(two) -> None:
    model, _, _, ref_b = two
    lorakit.set_adapter(model, "a")
    x = torch.randn(4, 8)
    want = ref_b(x)
    plain = lorakit.merge_and_unload(model, "b")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    # merging folds s*B*A into W in fp32 and casts once: one fp32 rounding of values of order 1-10
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    assert owned.OWNED_ATTR not in plain.__dict__


def test_two_active_adapters_that_train_one_module_are_refused(two) -> None:
    model, _, ref_a, _ = two
    lorakit.set_adapter(model, "a")
    with pytest.raises(lorakit.ConfigError, match="cannot be active together"):
        lorakit.set_adapter(model, ["a", "b"])
    x = torch.randn(3, 8)
    assert lorakit.active_adapters(model) == ("a",) and torch.equal(model(x), ref_a(x))


def test_mixed_batch_refuses_adapters_with_trained_modules(two) -> None:
    model, _, _, _ = two
    with pytest.raises(lorakit.MixedBatchError, match="train modules or biases fully"):
        with lorakit.mixed_batch(model, ["a", None]):
            pass


def test_mixed_batch_rows_without_adapter_see_the_base_head(tmp_path) -> None:
    model = _base()
    x = torch.randn(2, 8)
    base_out = model(x)
    lorakit.inject(model, _cfg(train_modules=[HEAD]), "headed")
    with torch.no_grad():
        model[2].weight.add_(1.0)  # the active adapter's head, not the base's
    lorakit.inject(model, _cfg(), "plain", activate=False)
    with lorakit.mixed_batch(model, [None, None]):
        assert torch.equal(model(x), base_out)
    assert not torch.equal(model(x), base_out)  # "headed" is back after the block


def test_copies_pickle_deepcopy_and_follow_unload() -> None:
    model = _trained(3, bias="lora_only")
    x = torch.randn(4, 8)
    out = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), out)
        with lorakit.disabled(clone):
            assert torch.equal(clone(x), _base()(x))
    lorakit.unload(model)
    assert _same(_state(model), _state(_base()))


def test_batchnorm_copies_stay_frozen_in_train_mode() -> None:
    """With batchnorm="frozen" a trained BatchNorm copy and the base's original never update statistics."""
    model = _base()
    lorakit.inject(model, _cfg(train_modules=["3"]))
    model.train()
    model(torch.randn(6, 8))
    with lorakit.disabled(model):
        model(torch.randn(6, 8))
    entry = owned.entries(model)["3"]
    for bn in (entry.base, entry.copies["default"]):
        assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_a_train_module_holding_lora_layers_is_refused() -> None:
    model = _base()
    lorakit.inject(model, _cfg(), "a")
    nested = nn.Sequential(model)  # "0" is now a whole model whose "0.0" carries adapter a
    before = _state(nested)
    with pytest.raises(lorakit.ConfigError, match="contains LoRA layers"):
        lorakit.inject(nested, lorakit.LoraConfig(r=2, targets=["0.2"], train_modules=["0"]), "b")
    assert _same(_state(nested), before) and lorakit.list_adapters(nested) == ["a"]


def test_nested_places_of_two_adapters_are_refused() -> None:
    model = _base()
    lorakit.inject(model, _cfg(bias="all"), "a")  # owns every bias, "2.bias" among them
    with pytest.raises(lorakit.ConfigError, match="nests with"):
        lorakit.inject(model, _cfg(train_modules=[HEAD]), "b")
    assert lorakit.list_adapters(model) == ["a"]
