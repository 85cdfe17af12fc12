"""Core calls that used to answer wrongly or with a raw traceback (issue 12, items 3, 5, 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.config import as_patterns


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0", "2"], init="random"), name)
    return model


def test_one_string_is_one_name_in_mixed_batch() -> None:
    """Item 3: ``mixed_batch(model, "aba")`` is one name, not the names "a", "b", "a"."""
    model = _model()
    with pytest.raises(lorakit.AdapterNotFoundError, match="aba"):
        with lorakit.mixed_batch(model, "aba"):
            pass
    x = torch.randn(1, 8)
    lorakit.set_adapter(model, "a")
    want = model(x)
    with lorakit.mixed_batch(model, "a"):  # a batch of one sample with adapter "a"
        assert torch.equal(model(x), want)


def test_one_string_is_one_pattern_in_a_config() -> None:
    """Item 3: ``exclude="2"`` excludes module "2" (not the characters of the string)."""
    config = lorakit.LoraConfig(targets=["0", "2"], exclude="2")
    assert config.exclude == ("2",)
    report = lorakit.inject(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), config)
    assert [t.name for t in report.targets] == ["0"]


def test_patterns_a_string_is_one() -> None:
    """Item 3: a string is one pattern, a list its patterns, None none; anything else is named."""
    assert as_patterns("exclude", "model.0.conv") == ("model.0.conv",)
    assert as_patterns("exclude", ["a", "b"]) == ("a", "b")
    assert as_patterns("exclude", None) == ()
    with pytest.raises(lorakit.ConfigError, match=r"train_modules: expected path patterns \(strings\), got 3"):
        as_patterns("train_modules", ["a", 3])
    with pytest.raises(lorakit.ConfigError, match="LoraConfig.exclude: expected a path pattern"):
        lorakit.LoraConfig(targets=["0"], exclude=5)  # type: ignore[arg-type]


def test_a_name_twice_is_refused_not_counted_twice() -> None:
    """Item 5: ``set_adapter(model, ["a", "a"])`` applied a's delta twice."""
    model = _model()
    lorakit.set_adapter(model, "b")
    for call in (lambda: lorakit.set_adapter(model, ["a", "a"]), lambda: lorakit.merge(model, ["a", "a"])):
        with pytest.raises(lorakit.ConfigError, match="distinct"):
            call()
    assert lorakit.active_adapters(model) == ("b",)
    assert all(not layer.lora_merged for _, layer in lorakit.lora_layers(model))


def test_state_changes_inside_a_mixed_batch_are_refused() -> None:
    """Item 5: ``merge()`` inside ``mixed_batch`` made the rows marked None differ from the base."""
    model = _model()
    x = torch.randn(2, 8)
    with lorakit.disabled(model):
        base_out = model(x)
    with lorakit.mixed_batch(model, ["a", None]):
        for call in (
            lambda: lorakit.merge(model, "a"),
            lambda: lorakit.merge_and_unload(model, "a"),
            lambda: lorakit.unmerge(model),
            lambda: lorakit.set_adapter(model, "b"),
            lambda: lorakit.delete_adapter(model, "b"),
        ):
            with pytest.raises(lorakit.MixedBatchError, match="inside a mixed_batch block"):
                call()
        assert torch.equal(model(x)[1], base_out[1])
    assert lorakit.list_adapters(model) == ["a", "b"]
    assert all(not layer.lora_merged for _, layer in lorakit.lora_layers(model))


@pytest.mark.parametrize("names", [None, 3, ["a", None]])
def test_set_adapter_with_no_names_is_a_typed_error(names) -> None:
    """Item 10: ``set_adapter(model, None)`` raised a raw TypeError."""
    model = _model()
    with pytest.raises(lorakit.ConfigError, match="adapter names"):
        lorakit.set_adapter(model, names)


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_meta_device_model(tmp_path) -> None:
    """Item 10: LoRA forward, merge, save and load on a meta-device model raised raw errors.

    Forward works (shape inference on an unmaterialised model is legitimate); the calls
    that need values raise MetaTensorError and change nothing.
    """
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lorakit.inject(real, lorakit.LoraConfig(r=2, targets=["0"]))
    lorakit.save_adapter(real, tmp_path / "real")

    model = _meta_model()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["0"]))
    assert model(torch.randn(3, 4, device="meta")).shape == (3, 2)
    with pytest.raises(lorakit.MetaTensorError, match="meta device.*nothing was merged"):
        lorakit.merge(model)
    assert not model[0].lora_merged
    with pytest.raises(lorakit.MetaTensorError, match="was not saved"):
        lorakit.save_adapter(model, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
    fresh = _meta_model()
    with pytest.raises(lorakit.MetaTensorError, match="was not loaded"):
        lorakit.load_adapter(fresh, tmp_path / "real")
    assert lorakit.list_adapters(fresh) == []


@pytest.mark.parametrize("value", ["x", "0", "-3", "2.5", "True"])
def test_inspect_refuses_a_bad_rank(value, capsys) -> None:
    """Item 10: ``lorakit inspect r=x`` raised ValueError; r=0 and r=-3 printed a negative budget."""
    assert main(["inspect", "model=torchvision.models:resnet18", f"r={value}"]) == 2
    err = capsys.readouterr().err
    assert "r must be an int > 0" in err and "Traceback" not in err
