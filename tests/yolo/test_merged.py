"""The trainer's merged EMA copy (lorakit.yolo.merged): refreshed in place, it must equal
``merge_and_unload(deepcopy(ema))`` bitwise, for LoRA factors, fully trained BatchNorm and class
convs (owned copies), and follow later changes of the source."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch import nn

import lorakit

pytestmark = pytest.mark.slow


def _lora_detector(seed: int = 0) -> nn.Module:
    """yolo26n (3 classes) with the trainer's default LoRA: r=8 convs, BatchNorm and class convs trained fully."""
    from ultralytics.nn.tasks import DetectionModel

    from lorakit.yolo.targets import class_convs
    from lorakit.yolo.trainer import LoraOptions

    torch.manual_seed(seed)
    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    lorakit.inject(model, LoraOptions().build(model, class_convs(model)))
    return model


def _perturb(model: nn.Module, seed: int) -> None:
    """What training does to the EMA: move B (zero at start) and every fully trained tensor and buffer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and (name.endswith(".B") or "bn." in name or "cv3." in name):
                t.add_(torch.randn(t.shape, generator=gen) * 0.05)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert different == []


def test_refreshed_copy_equals_a_fresh_merge_bitwise_and_follows_the_source() -> None:
    from lorakit.yolo.merged import MergedCopy

    ema = _lora_detector()
    _perturb(ema, seed=1)
    copy = MergedCopy(ema)
    merged = copy.refresh(ema, version=1)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())  # an EMA: nothing trains it
    _assert_same_state(merged, lorakit.merge_and_unload(deepcopy(ema)))

    _perturb(ema, seed=2)  # the EMA moves on (one more epoch)
    ema.names = {0: "a", 1: "b", 2: "c"}  # as ModelEMA.update_attr sets plain attributes
    stale = {k: v.clone() for k, v in merged.state_dict().items()}
    assert copy.refresh(ema, version=1) is merged  # same version: nothing copied
    assert all(torch.equal(v, stale[k]) for k, v in merged.state_dict().items())
    assert copy.refresh(ema, version=2) is merged
    _assert_same_state(merged, lorakit.merge_and_unload(deepcopy(ema)))
    assert merged.names == ema.names
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, stale[k])]
    assert any(k.endswith("conv.weight") for k in changed)  # merged LoRA deltas moved
    assert any("bn." in k for k in changed)  # owned BatchNorm copies moved

    other = deepcopy(ema)  # a new EMA object of the same model (NaN recovery, resume): what goes where is found again
    _perturb(other, seed=3)
    assert copy.refresh(other, version=2) is merged
    _assert_same_state(merged, lorakit.merge_and_unload(deepcopy(other)))


def test_a_new_ema_of_the_same_model_fits_another_model_does_not() -> None:
    from lorakit.yolo.merged import MergedCopy

    ema = _lora_detector()
    copy = MergedCopy(ema)
    assert copy.fits(deepcopy(ema))  # what NaN recovery and resume make: a new EMA, same structure
    from ultralytics.nn.tasks import DetectionModel

    assert not copy.fits(DetectionModel("yolo26n.yaml", nc=5, verbose=False))  # other class count
