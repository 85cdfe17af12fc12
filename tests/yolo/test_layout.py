"""Channels-last training (lorakit.yolo.layout): the same maths as the usual layout, files in the usual layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.batchnorm import freeze_batchnorm
from lorakit.errors import ConfigError
from lorakit.layers.conv import _pointwise
from lorakit.yolo import layout


def _lora_detector() -> nn.Module:
    from ultralytics.cfg import get_cfg  # imported in the test: the conftest makes Ultralytics offline first
    from ultralytics.nn.tasks import DetectionModel

    from lorakit.yolo.trainer import LoraOptions

    torch.manual_seed(0)
    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    lorakit.inject(model, LoraOptions().build(model, []))
    for m in model.modules():  # as the trainer leaves them: B non-zero so every LoRA path carries a gradient
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            freeze_batchnorm(m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    return model.train()


def _grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch)[0].sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_channels_last_training_step_equals_the_usual_layout(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and every gradient (LoRA factors, BatchNorm, fully trained modules) agree between the layouts,
    in both LoRA forms (the activation form runs its 1x1 factors through ``_pointwise``'s channels-last path).

    Only the summation order differs. Tolerance per gradient tensor: 2e-3 of its own largest magnitude
    plus 2e-6 of the largest gradient anywhere (G, about 15 here). fp32 rounds at 6e-8 relative per
    operation; the deepest sums (a 3x3 conv's weight gradient over 2 images of 64x64, up to
    128*9*32*32 = 1.2e6 terms) and about 60 layers of backward put the layout-to-layout difference at
    1e-6..1e-4 of a tensor's scale. The second term is for gradients that are zero in exact arithmetic
    (some BatchNorm biases: 1e-11..1e-7 here): they hold only rounding noise of the backward's large
    values. Measured: at most 0.15 of the allowance, in either form. A wrong layout conversion
    errs by order 1.
    """
    monkeypatch.setattr(lorakit.handler_for(nn.Conv2d), "mode", form)
    model = _lora_detector()
    g = torch.Generator().manual_seed(0)
    n = 2
    batch = {
        "img": torch.rand(n, 3, 64, 64, generator=g),
        "cls": torch.randint(0, 3, (n * 2, 1), generator=g).float(),
        "bboxes": torch.rand(n * 2, 4, generator=g) * 0.5 + 0.25,
        "batch_idx": torch.arange(n).repeat_interleave(2).float(),
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_ref, ref = _grads(model, batch)
    model.load_state_dict(state)  # BatchNorm's running statistics moved in that step
    params = dict(model.named_parameters())
    assert layout.to_channels_last(model) is model
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects: an optimizer keeps them
    assert params["model.1.conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not params["model.1.conv.weight"].is_contiguous()
    loss, got = _grads(model, batch)
    assert got.keys() == ref.keys() and len(got) > 100
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    big = max(v.abs().max().item() for v in ref.values())
    excess = {k: ((got[k] - ref[k]).abs().max() / (2e-3 * ref[k].abs().max() + 2e-6 * big)).item() for k in ref}
    worst = max(excess, key=excess.__getitem__)
    assert excess[worst] <= 1, f"{worst}: {excess[worst]:.3g} of the allowance"


def test_usual_layout_gives_the_usual_layout_inside_and_channels_last_after() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with layout.usual_layout(model):  # nothing channels-last: nothing to do
        assert model[0].weight.is_contiguous()
    layout.to_channels_last(model)
    assert not model[0].weight.is_contiguous()
    with layout.usual_layout(model) as same:
        assert same is model
        assert all(v.is_contiguous() for v in model.state_dict().values())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pointwise_on_channels_last_input_is_the_1x1_convolution() -> None:
    """The channels-last branch of ``_pointwise`` (one ``linear`` over all pixels): forward and both
    gradients equal ``conv2d``'s up to fp32 summation order (16 terms: 1e-6 relative is ample)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 5, 7, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 16, 1, 1, generator=g, requires_grad=True)
    dy = torch.randn(3, 8, 5, 7, generator=g)
    y = _pointwise(w, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_ref = F.conv2d(x, w)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_the_setting_auto_means_on_a_cpu_only_and_bad_values_are_refused() -> None:
    from lorakit.yolo.trainer import LoraOptions

    assert layout.wanted(None, torch.device("cpu"))
    assert not layout.wanted(None, torch.device("cuda", 0))
    assert layout.wanted(True, torch.device("cuda", 0)) and not layout.wanted(False, torch.device("cpu"))
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ConfigError, match="channels_last must be None, True or False"):
            LoraOptions(channels_last=bad)  # type: ignore[arg-type]
