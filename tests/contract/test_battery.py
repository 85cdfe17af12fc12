"""One battery of invariants, run over every layer type and option in cases.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig

from .cases import CASES, IDS, Case


def _setup(case: Case, init: str = "random", alpha: float = 3.0, name: str = "default"):
    torch.manual_seed(0)
    model = case.build().eval()
    x = case.make_input()
    with torch.no_grad():
        base_out = model(x)
    cfg = LoraConfig(r=case.r, alpha=alpha, targets=["layer"], init=init, **case.config)
    report = lorakit.inject(model, cfg, name)
    return model, x, base_out, report


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_init_leaves_outputs_unchanged(case: Case, init: str) -> None:
    model, x, base_out, _ = _setup(case, init=init)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    adapter = model.layer.lora["default"]
    assert torch.count_nonzero(adapter.B) == 0
    assert torch.count_nonzero(adapter.A) > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disabled_equals_base_exactly(case: Case) -> None:
    model, x, base_out, _ = _setup(case)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base_out), "a random-init adapter must change the output"
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        assert torch.equal(model(x), adapted)
        # also when the adapter is merged
        lorakit.merge(model)
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        assert _rel(model(x), adapted) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_equals_unmerged(case: Case) -> None:
    model, x, _, _ = _setup(case)
    with torch.no_grad():
        unmerged = model(x)
        w0 = model.layer.weight.detach().clone()
        lorakit.merge(model)
        assert not torch.equal(model.layer.weight, w0)
        assert _rel(model(x), unmerged) < 1e-5
        lorakit.merge(model)  # merging again is a no-op
        assert _rel(model(x), unmerged) < 1e-5
        lorakit.unmerge(model)
        assert torch.equal(model.layer.weight, w0)
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_1000_cycles_bitwise(case: Case) -> None:
    model, x, _, _ = _setup(case)
    w0 = model.layer.weight.detach().clone()
    for _ in range(1000):
        lorakit.merge(model)
        lorakit.unmerge(model)
    assert torch.equal(model.layer.weight, w0)
    assert "lora_base_weight" not in dict(model.layer.named_buffers())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_leaves_plain_layer(case: Case) -> None:
    model, x, _, _ = _setup(case)
    base_cls = type(case.build().layer)
    with torch.no_grad():
        unmerged = model(x)
        lorakit.merge_and_unload(model)
        assert type(model.layer) is base_cls
        assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
        assert set(model.state_dict()) == set(case.build().state_dict())
        assert _rel(model(x), unmerged) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nonfinite_adapter_refused_before_any_change(case: Case) -> None:
    model, x, _, _ = _setup(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.layer.lora["default"].A[0].fill_(float("nan"))
    with pytest.raises(lorakit.NonFiniteError, match="layer"):
        lorakit.merge(model)
    after = model.state_dict()
    for k, v in before.items():
        if ".lora." not in k:
            assert torch.equal(after[k], v), k
    assert model.layer.lora_merged == ()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_changes_only_adapters(case: Case) -> None:
    model, x, _, report = _setup(case, init="kaiming")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["layer.lora.default.A", "layer.lora.default.B"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn_like(model(x))
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith((".A", ".B")):
            assert not torch.equal(after[k], v), f"{k} did not train"
        else:
            assert torch.equal(after[k], v), f"{k} changed"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pickle_and_deepcopy(case: Case) -> None:
    model, x, _, _ = _setup(case)
    with torch.no_grad():
        out = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone.layer) is type(model.layer)
            assert torch.equal(clone(x), out)
            lorakit.merge(clone)  # the copy is a working LoRA model, independent of the original
            assert _rel(clone(x), out) < 1e-5
    assert model.layer.lora_merged == ()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_keeps_base_keys_and_counts_match_formulas(case: Case) -> None:
    torch.manual_seed(0)
    plain_keys = set(case.build().state_dict())
    model, _, _, report = _setup(case)
    keys = set(model.state_dict())
    assert plain_keys <= keys
    assert keys - plain_keys == {f"layer.lora.default.{k}" for k in ("A", "B", "scaling")}
    assert isinstance(model.layer, type(case.build().layer))
    assert report.lora_params == case.expected_params(case.r)
    assert report.trainable == case.expected_params(case.r)
    assert report.total == sum(p.numel() for p in case.build().parameters()) + case.expected_params(case.r)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_adapters_sum_and_delete_leaves_no_trace(case: Case) -> None:
    model, x, base_out, _ = _setup(case, name="a")
    keys_a = set(model.state_dict())
    torch.manual_seed(1)
    lorakit.inject(model, LoraConfig(r=case.r, alpha=5.0, targets=["layer"], init="random", **case.config), "b")
    with torch.no_grad():
        lorakit.set_adapter(model, "a")
        ya = model(x)
        lorakit.set_adapter(model, "b")
        yb = model(x)
        lorakit.set_adapter(model, ["a", "b"])
        yab = model(x)
    assert lorakit.active_adapters(model) == ("a", "b")
    expected = base_out + (ya - base_out) + (yb - base_out)
    assert _rel(yab, expected) < 1e-5
    assert not torch.allclose(yab, ya)
    lorakit.delete_adapter(model, "b")
    assert set(model.state_dict()) == keys_a
    assert list(model.layer.lora) == ["a"]
    assert lorakit.list_adapters(model) == ["a"]
    with torch.no_grad():
        assert torch.equal(model(x), ya)
    lorakit.delete_adapter(model, "a")
    assert type(model.layer) is type(case.build().layer)
    assert not hasattr(model.layer, "lora")
    with torch.no_grad():
        assert torch.equal(model(x), base_out)


def test_batchnorm_frozen_by_default_and_released_on_unload() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # give BN non-trivial statistics
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    lorakit.inject(model, LoraConfig(r=2, target_types=["Conv2d"]))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
        opt.step()
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), f"{k} changed"
    lorakit.unload(model)
    model.train()
    model(torch.randn(4, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, buffers["1.running_mean"])


def test_batchnorm_update_policy_lets_statistics_move() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    lorakit.inject(model, LoraConfig(r=2, target_types=["Conv2d"], batchnorm="update"))
    before = model[1].running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 8, 8))
    assert not torch.equal(model[1].running_mean, before)


def test_init_statistics() -> None:
    """A is Kaiming-uniform (bound 1/sqrt(fan_in)) or N(0, 1/r); B is exactly zero.

    Kolmogorov-Smirnov distance against each candidate distribution: the right one
    is within the 0.1 % critical value 1.95/sqrt(n), the wrong one far outside it.
    """
    torch.manual_seed(0)
    fan_in, r = 512, 64
    n = fan_in * r
    crit = 1.95 / n**0.5

    def ks(sample: torch.Tensor, cdf) -> float:
        s, _ = sample.flatten().double().sort()
        emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
        emp_lo = torch.arange(0, n, dtype=torch.float64) / n
        c = cdf(s)
        return float(torch.maximum((emp_hi - c).abs(), (c - emp_lo).abs()).max())

    bound = 1 / fan_in**0.5

    def uniform_cdf(s):
        return ((s + bound) / (2 * bound)).clamp(0, 1)

    def normal_cdf(std):
        return lambda s: 0.5 * (1 + torch.erf(s / (std * 2**0.5)))

    for init, right, wrong in [
        ("kaiming", uniform_cdf, normal_cdf(bound / 3**0.5)),  # same variance, other shape
        ("gaussian", normal_cdf(1 / r), uniform_cdf),
    ]:
        model = Net_linear(fan_in)
        lorakit.inject(model, LoraConfig(r=r, targets=["layer"], init=init))
        A, B = model.layer.lora["default"].A, model.layer.lora["default"].B
        assert torch.count_nonzero(B) == 0
        assert ks(A.detach(), right) < crit, init
        assert ks(A.detach(), wrong) > 3 * crit, init


def Net_linear(fan_in: int) -> nn.Module:
    from .cases import Net

    return Net(nn.Linear(fan_in, 32))
