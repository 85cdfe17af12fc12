"""LoRA+ parameter groups: B factors at ``lr * ratio``, everything else trainable at ``lr``."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import ConfigError, TargetError, loraplus_groups

from .io_models import IDS, adapted_net, make_net


def _lora_factors(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a, b = [], []
    for _, layer in lorakit.lora_layers(model):
        for ad in layer.lora.values():
            a.append(ad.A)
            b.append(ad.B)
    return a, b


def test_each_trainable_parameter_is_in_exactly_one_group_with_its_lr() -> None:
    # every built-in layout (Embedding, Conv2d, grouped Conv2d, Linear), a fully trained head, trained biases
    model = adapted_net(train_modules=["head"], bias="lora_only")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["lin"]), name="second", activate=False)  # frozen
    groups = loraplus_groups(model, lr=1e-3, ratio=16.0, weight_decay=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # each exactly once
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    a, b = _lora_factors(model)
    a_live, b_live = [p for p in a if p.requires_grad], [p for p in b if p.requires_grad]
    assert len(a_live) == 4 and len(a_live) < len(a)  # the frozen adapter's factors stay out
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3 * 16, 0.01), (1e-3, 0.01)]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in a_live]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in b_live]
    others = groups[2]["params"]
    assert others and not {id(p) for p in others} & {id(p) for p in a + b}  # head copies and biases
    torch.optim.AdamW(groups)  # a valid argument for an optimizer


def test_an_empty_group_is_left_out() -> None:
    groups = loraplus_groups(adapted_net(), lr=0.1)
    assert [g["lr"] for g in groups] == [0.1, 0.1 * 16.0]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_an_adamw_step_moves_b_ratio_times_as_far(weight_decay: float) -> None:
    """Adam's first step is ``lr * m/(sqrt(v)+eps)`` with ``m/sqrt(v) = sign(g)``, and AdamW's
    decay ``lr * wd * p``: both scale with the group's lr, so from the same state and gradient
    B moves exactly ``ratio`` times as far and A and the others the same."""
    ratio, lr = 16.0, 1e-3
    plain = adapted_net(train_modules=["head"])  # init="random": A and B non-zero, both get gradients
    plus = copy.deepcopy(plain)
    before = copy.deepcopy(plain.state_dict())
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)  # fmt: skip
    opt_plus = torch.optim.AdamW(loraplus_groups(plus, lr, ratio=ratio, weight_decay=weight_decay))
    for model, opt in ((plain, opt_plain), (plus, opt_plus)):
        model(IDS).square().mean().backward()
        opt.step()
    moved_plain = {k: v - before[k] for k, v in plain.state_dict().items()}
    moved_plus = {k: v - before[k] for k, v in plus.state_dict().items()}
    eps = torch.finfo(torch.float32).eps
    n_b = 0
    for k, d in moved_plain.items():
        if k.endswith(".B"):
            n_b += 1
            # ratio = 16 is a power of two, so lr * ratio scales the step exactly; what differs is the
            # rounding of B + step to fp32 in each run (half an ulp of |B| each), seen through
            # the difference: (ratio + 1) * eps * max|B| bounds it.
            tol = (ratio + 1) * eps * float(before[k].abs().max())
            assert float(d.abs().max()) > 100 * tol  # a real move, far above the rounding
            torch.testing.assert_close(moved_plus[k], ratio * d, rtol=0, atol=tol)
        else:  # A factors, the head's copy: the same lr, the same step, bitwise
            assert torch.equal(moved_plus[k], d), k
    assert n_b == 4


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"ratio": 0}, "ratio must be a finite number > 0, got 0"),
        ({"ratio": -16.0}, "ratio must be a finite number > 0, got -16.0"),
        ({"ratio": float("nan")}, "ratio must be a finite number > 0, got nan"),
        ({"ratio": True}, "ratio must be a finite number > 0, got True"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
    ],
)
def test_bad_numbers_are_config_errors(kw: dict[str, float], needle: str) -> None:
    args: dict[str, float] = {"lr": 1e-3, **kw}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        loraplus_groups(adapted_net(), **args)


def test_a_model_without_lora_layers_is_a_target_error() -> None:
    with pytest.raises(TargetError, match="Net has no LoRA layers; inject an adapter"):
        loraplus_groups(make_net(), lr=1e-3)


def test_a_model_whose_factors_are_all_frozen_is_a_target_error() -> None:
    model = adapted_net()
    model.requires_grad_(False)
    with pytest.raises(TargetError, match="no LoRA factor of Net trains"):
        loraplus_groups(model, lr=1e-3)


def test_split_moves_each_groups_B_factors_to_a_scaled_copy_of_the_group() -> None:
    """``loraplus_split`` for optimizers an engine built (Ultralytics' decay/no-decay/bias groups)."""
    from lorakit import loraplus_split

    model = adapted_net(train_modules=["head"], bias="lora_only")
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() > 1]
    no_decay = [p for p in trainable if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05, "param_group": "weight"}, {"params": no_decay, "weight_decay": 0.0}],
        lr=2e-3,
    )
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]  # as an lr scheduler sets it
    _, b = _lora_factors(model)
    b_ids = {id(p) for p in b}
    assert loraplus_split(opt, model, ratio=4.0) is opt
    groups = opt.param_groups
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # each parameter exactly once
    scaled = [g for g in groups if any(id(p) in b_ids for p in g["params"])]
    assert scaled and all(all(id(p) in b_ids for p in g["params"]) for g in scaled)
    assert {id(p) for g in scaled for p in g["params"]} == b_ids
    for g in scaled:  # settings copied from the group the factors came from, lr and initial_lr x4
        assert g["lr"] == g["initial_lr"] == 2e-3 * 4
        assert (g["weight_decay"], g.get("param_group")) == (0.05, "weight")
    assert all(g["lr"] == 2e-3 for g in groups if g not in scaled)


def test_split_refusals() -> None:
    from lorakit import loraplus_split

    model = adapted_net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ConfigError, match="ratio must be"):
        loraplus_split(opt, model, ratio=0)
    with pytest.raises(TargetError, match="no LoRA layers"):
        loraplus_split(opt, make_net(), ratio=16)
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS).sum().backward()
    adam.step()
    with pytest.raises(ConfigError, match="stepped already"):
        loraplus_split(adam, model, ratio=16)
