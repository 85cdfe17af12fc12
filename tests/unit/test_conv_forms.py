"""Choosing a LoRA conv's form: the weighted count rule, and forms measured at the real input shapes."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn

import lorakit
from lorakit.conv_forms import measure_conv_forms, time_forms
from lorakit.layers import CONV_FORM_ATTR, ConvHandler, LoraLayer


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 1)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.c1d = nn.Conv1d(32, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g(self.c2(self.bn(self.c1(x))))
        y = self.c1d(y.flatten(2))
        return self.fc(y.mean(-1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    lorakit.inject(model, lorakit.LoraConfig(r=4, targets=["c1", "c2", "g", "c1d", "fc"], init="random"))
    return model


def _convs(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and n != "fc"}


def test_the_rule_weights_thin_convolutions() -> None:
    """1x1 64->64 at r=8: plain counts (4,096 vs 3 x 1,024) said activation; thin convs cost ~4x per
    multiply-add on a CPU, so the weight form. A 3x3 256->256 conv keeps the activation form."""
    handler = ConvHandler()
    small, big = nn.Conv2d(64, 64, 1), nn.Conv2d(256, 256, 3)
    for conv in (small, big):
        lorakit.inject(conv, lorakit.LoraConfig(r=8, targets=["*"]))
    assert handler.use_weight_form(small)  # type: ignore[arg-type]
    assert not handler.use_weight_form(big)  # type: ignore[arg-type]
    handler.thin_cost = 1.0
    assert not handler.use_weight_form(small)  # type: ignore[arg-type]


def test_measured_forms_are_recorded_and_change_no_value() -> None:
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    measured = measure_conv_forms(model, lambda: model(x), shrink=2)

    assert set(measured) == set(_convs(model)) == {"c1", "c2", "g", "c1d"}
    for path, layer in _convs(model).items():
        form, rank = layer.__dict__[CONV_FORM_ATTR]
        assert (form == "weight") == bool(measured[path]["chosen"]) and rank == 4
        assert measured[path]["activation"] > 0 and measured[path]["weight"] > 0
    # the shape-finding forward left BatchNorm's statistics alone, the timing left .grad alone
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    # either form gives the same numbers (float32: both sum the same products in another order)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["activation", "weight"])
def test_a_recorded_form_is_used_until_the_adapters_change(form: str) -> None:
    model = _model()
    handler = ConvHandler()
    layer = _convs(model)["c2"]
    layer.__dict__[CONV_FORM_ATTR] = (form, 4)
    assert handler.use_weight_form(layer) == (form == "weight")
    handler.mode = "activation"  # a forced mode wins
    assert not handler.use_weight_form(layer)
    handler.mode = "auto"
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["c2"]), "second")
    lorakit.set_adapter(model, ["default", "second"])  # rank 6 now: the record (rank 4) no longer applies
    rule = handler.use_weight_form(layer)
    layer.__dict__[CONV_FORM_ATTR] = ("weight" if not rule else "activation", 4)
    assert handler.use_weight_form(layer) == rule


def test_time_forms_keeps_gradients_and_the_record() -> None:
    model = _model()
    layer = _convs(model)["g"]
    for p in layer.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    layer.__dict__[CONV_FORM_ATTR] = ("weight", 4)
    seconds = time_forms(layer, (2, 32, 8, 8))
    assert set(seconds) == {"activation", "weight"}
    assert layer.__dict__[CONV_FORM_ATTR] == ("weight", 4)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in layer.parameters() if p.requires_grad)


def test_bad_arguments() -> None:
    model = _model()
    with pytest.raises(ValueError, match="shrink"):
        measure_conv_forms(model, lambda: None, shrink=0)


class _ConvOps(torch.utils._python_dispatch.TorchDispatchMode):  # type: ignore[misc]
    """Counts the convolution kernels (forward and backward) that run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.convs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("conv", "lora_convs"),
    [
        (nn.Conv2d(16, 24, 1), 0),  # 1x1: A and B are matrix products
        (nn.Conv2d(16, 24, 3, padding=1, stride=2), 2),  # A is a 3x3 conv (forward, backward); B a product
        (nn.Conv2d(16, 24, 1, padding="same"), 0),
        (nn.Conv1d(16, 24, 1), 0),
        (nn.Conv2d(16, 24, 1, groups=4), 4),  # grouped: both stay convolutions
    ],
)
def test_activation_form_runs_pointwise_factors_as_matrix_products(conv: nn.Module, lora_convs: int) -> None:
    """The thin r-channel convolutions of the activation form run far below a CPU's GEMM speed; a 1x1
    one (B always, A of a 1x1 conv) is a batched matrix product, several times faster
    (bench/conv_forms.py). Outputs and gradients are the convolution form's to float32 rounding."""
    torch.manual_seed(0)
    lorakit.inject(conv, lorakit.LoraConfig(r=4, targets=["*"], init="random"))
    handler = ConvHandler()
    layer = cast(LoraLayer, conv)
    x = torch.randn(3, 16, *([12] * (conv.weight.dim() - 2)), requires_grad=True)
    results = {}
    for form in ("activation", "weight"):
        layer.__dict__[CONV_FORM_ATTR] = (form, 4)
        assert handler.use_weight_form(layer) == (form == "weight")
        with _ConvOps() as ops:
            y = conv(x)
            y.backward(torch.cos(y.detach()))
        if form == "activation":  # the base conv's forward and backward, plus the factors' convs
            assert ops.convs == 2 + lora_convs
        grads = {n: p.grad.clone() for n, p in conv.named_parameters() if p.grad is not None}
        results[form] = (y.detach(), x.grad.clone(), grads)
        x.grad = None
        conv.zero_grad(set_to_none=True)
    (ya, gxa, gpa), (yw, gxw, gpw) = results["activation"], results["weight"]
    # float32, sums of <= 16*9 products of unit-sized values: both forms agree to a few ulps of their size
    torch.testing.assert_close(ya, yw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxa, gxw, rtol=1e-5, atol=1e-5)
    assert gpa.keys() == gpw.keys() and gpa
    for n in gpa:  # the factors' gradients sum over the batch and the 12x12 pixels too
        torch.testing.assert_close(gpa[n], gpw[n], rtol=1e-4, atol=1e-4)


def test_pointwise_factors_keep_unbatched_and_channels_last_inputs() -> None:
    """Inputs the matrix product does not take as they are (unbatched, channels-last) use the convolutions."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 1)
    lorakit.inject(conv, lorakit.LoraConfig(r=4, targets=["*"], init="random"))
    layer = cast(LoraLayer, conv)
    x = torch.randn(2, 8, 5, 5)
    layer.__dict__[CONV_FORM_ATTR] = ("weight", 4)
    want = conv(x)
    layer.__dict__[CONV_FORM_ATTR] = ("activation", 4)
    torch.testing.assert_close(conv(x[0]), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last)), want, rtol=1e-5, atol=1e-6)
