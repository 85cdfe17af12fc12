"""Default LoRA targets on a YOLO26n detector (built from YAML, no training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.yolo.targets import class_convs, default_exclusions, detector_config


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolo26n.yaml", nc=2, verbose=False)


def test_class_convs_cover_both_heads(detector: nn.Module) -> None:
    paths = class_convs(detector)
    assert paths == [f"model.23.{h}.{i}.2" for h in ("cv3", "one2one_cv3") for i in range(3)]
    for p in paths:
        assert detector.get_submodule(p).out_channels == 2


@pytest.mark.parametrize("r", [4, 8, 16])
def test_default_targets(detector: nn.Module, r: int) -> None:
    import copy

    model = copy.deepcopy(detector)
    excluded = default_exclusions(model, r)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = lorakit.inject(model, detector_config(model, r=r))
    adapted = {t.name for t in report.targets}
    assert adapted | set(excluded) == set(convs) and not adapted & set(excluded)
    assert "model.0.conv" in excluded  # the stem
    assert all(convs[n].groups == 1 for n in adapted)
    assert sum(convs[n].groups > 1 for n in excluded) == 14  # 12 head DWConvs + 2 attention pe
    # both heads and the attention 1x1 convs are adapted (at r=16 the 16-channel box convs are thin)
    wanted = ["model.23.cv3.0.1.1.conv", "model.23.one2one_cv3.2.1.1.conv", "model.10.m.0.attn.qkv.conv"]
    if r <= 8:
        wanted += ["model.23.cv2.0.0.conv", "model.23.one2one_cv2.1.1.conv"]
    for p in wanted:
        assert p in adapted
    # no adapted layer has LoRA bigger than itself
    assert all(t.params <= t.layer_params for t in report.targets)


def test_default_targets_count_r8(detector: nn.Module) -> None:
    import copy

    model = copy.deepcopy(detector)
    report = lorakit.inject(model, detector_config(model, r=8))
    assert len(report.targets) == 98
    assert report.trainable == report.lora_params
    # frozen_stride=4 leaves model.1.conv and three convs of model.2 out (model.2.m.0.cv1,
    # 16 -> 8 channels, is thin at r=8 anyway)
    model = copy.deepcopy(detector)
    report = lorakit.inject(model, detector_config(model, r=8, frozen_stride=4))
    assert len(report.targets) == 94
    assert not any(t.name.startswith(("model.1.", "model.2.")) for t in report.targets)


def test_early_layers_are_the_chain_up_to_the_stride(detector: nn.Module) -> None:
    from lorakit.yolo.targets import early_layers

    before = {k: v.clone() for k, v in detector.state_dict().items()}
    assert early_layers(detector, 4) == ["model.0", "model.1", "model.2"]  # stride 2, 4, 4
    assert early_layers(detector, 8) == [f"model.{i}" for i in range(5)]  # + stride 8 (model.3, model.4)
    assert early_layers(detector, 1) == [] and early_layers(detector, 0) == []
    assert early_layers(nn.Conv2d(3, 4, 3), 4) == []  # not an Ultralytics model: nothing frozen
    # the probe forward left the model (BatchNorm statistics included) and its mode as they were
    assert detector.training and all(torch.equal(v, before[k]) for k, v in detector.state_dict().items())
    excluded = default_exclusions(detector, 8, frozen_stride=4)
    assert "early layer" in excluded["model.1.conv"] and "stem" in excluded["model.0.conv"]
    assert "model.1.conv" not in default_exclusions(detector, 8)  # the default adapts it


def test_lora_options_refuse_a_bad_frozen_stride() -> None:
    from lorakit.yolo import LoraOptions

    for bad in (-1, 2.0, True, "4"):
        with pytest.raises(lorakit.ConfigError, match="frozen_stride must be an int >= 0"):
            LoraOptions(frozen_stride=bad)  # type: ignore[arg-type]


def test_train_modules_are_trained_not_adapted(detector: nn.Module) -> None:
    import copy

    model = copy.deepcopy(detector)
    heads = class_convs(model)
    report = lorakit.inject(model, detector_config(model, r=8, train_modules=heads))
    assert not {t.name for t in report.targets} & set(heads)
    for p in heads:
        m = model.get_submodule(p)
        assert type(m) is nn.Conv2d and all(q.requires_grad for q in m.parameters())


@pytest.mark.parametrize("bad", [{"r": 0}, {"dropout": 1.5}, {"alpha": -1.0}])
def test_lora_options_refuse_bad_values_before_any_run(bad: dict) -> None:
    from lorakit.yolo import LoraOptions

    with pytest.raises(lorakit.ConfigError, match=next(iter(bad))):
        LoraOptions(**bad)


def test_yolo_exclude_given_as_a_string_is_one_pattern(detector: nn.Module) -> None:
    """Issue item 3: ``LoraYOLO(exclude="model.23.cv2.0.0.conv")`` became ``('m', 'o', 'd', ...)``, so
    the named conv was adapted anyway. A string is one pattern in LoraYOLO, LoraOptions and
    detector_config; the layer LoraYOLO's trainer would build the adapter on is left unadapted."""
    import copy

    from lorakit.yolo import LoraOptions, LoraYOLO

    name, neighbour = "model.23.cv2.0.0.conv", "model.23.cv2.0.1.conv"
    default = {t.name for t in lorakit.inject(copy.deepcopy(detector), detector_config(detector, r=8)).targets}
    assert {name, neighbour} <= default  # both adapted unless excluded

    yolo = LoraYOLO("yolo26n.yaml", exclude=name)
    assert yolo.lora.exclude == (name,)
    assert LoraOptions(exclude=name).exclude == (name,)
    # what LoraDetectionTrainer.get_model injects: LoraOptions.build on the freshly built model
    for config in (yolo.lora.build(detector, []), detector_config(detector, r=8, exclude=name)):
        model = copy.deepcopy(detector)
        adapted = {t.name for t in lorakit.inject(model, config).targets}
        assert adapted == default - {name}
        assert type(model.get_submodule(name)) is nn.Conv2d


def test_yolo_exclude_that_is_not_patterns_is_a_config_error() -> None:
    """Issue item 3: an ``exclude`` that is neither a pattern nor a list of them (here an int, which
    ``tuple()`` refused with a bare TypeError) is a ConfigError naming the argument."""
    from lorakit.yolo import LoraOptions, LoraYOLO

    with pytest.raises(lorakit.ConfigError, match="exclude: expected a path pattern or a list of them, got 5"):
        LoraOptions(exclude=5)  # type: ignore[arg-type]
    with pytest.raises(lorakit.ConfigError, match="exclude"):
        LoraYOLO("yolo26n.yaml", exclude=5)  # type: ignore[arg-type]
