"""The DoRA variant's invariants, over every layer type in cases.py that DoRA supports (all but grouped convs).

Tolerances: fp32 layers with O(1) outputs. Merging rounds ``m/n * (W + s B A)`` once per weight entry and
the merged forward sums ``in x k`` products of it, so merged and unmerged agree to a few ulps of the
output scale: 1e-5 relative, as the plain battery. Zero init: ``m/n`` is exactly 1 (both are the same norm
of the same weight), but DoRA's forward adds the bias after ``W x`` while the base layer fuses them
(addmm, cuDNN), which can round the last bit differently: 1e-6 relative.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import MixedBatchError, TargetError
from lorakit.io import load_adapter, save_adapter

from .cases import CASES, IDS, Case, Net

DORA_CASES = [c for c in CASES if "groups" not in c.id and "depthwise" not in c.id]
GROUPED = [c for c in CASES if c not in DORA_CASES]
DORA_IDS = [c.id for c in DORA_CASES]


def _setup(case: Case, init: str = "random", name: str = "default", seed: int = 0):
    torch.manual_seed(seed)
    model = case.build().eval()
    x = case.make_input()
    with torch.no_grad():
        base_out = model(x)
    lorakit.inject(model, LoraConfig(r=case.r, alpha=3.0, targets=["layer"], init=init, dora=True, **case.config), name)
    if init == "random":  # magnitudes away from their init, as after training
        with torch.no_grad():
            m = model.layer.lora[name].magnitude
            m.mul_(1 + 0.5 * torch.rand_like(m))
    return model, x, base_out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_zero_init_leaves_outputs_unchanged(case: Case) -> None:
    model, x, base_out = _setup(case, init="kaiming")
    ad = model.layer.lora["default"]
    assert ad.variant == "dora" and ad.magnitude.shape == model.layer.lora_handler.magnitude_shape(model.layer)
    with torch.no_grad():
        assert _rel(model(x), base_out) < 1e-6


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_disabled_equals_base_and_unmerge_restores_bitwise(case: Case) -> None:
    model, x, base_out = _setup(case)
    w0 = model.layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, base_out), "a random-init DoRA adapter must change the output"
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        lorakit.merge(model)
        assert not torch.equal(model.layer.weight, w0)
        assert _rel(model(x), unmerged) < 1e-5
        with lorakit.disabled(model):
            assert torch.equal(model(x), base_out)
        lorakit.unmerge(model)
        assert torch.equal(model.layer.weight, w0)
        assert torch.equal(model(x), unmerged)
        lorakit.merge_and_unload(model)
        assert type(model.layer) is type(case.build().layer)
        assert not [k for k in vars(model.layer) if "lora" in k], "unload leaves no lorakit attribute behind"
        assert _rel(model(x), unmerged) < 1e-5


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_merge_rule_is_the_papers(case: Case) -> None:
    """Merged W = m * (W + s B A) / ||W + s B A||_c, the norm per output channel, written out here."""
    model, _, _ = _setup(case)
    layer = model.layer
    ad = layer.lora["default"]
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        new = w0 + ad.scaling * layer.lora_handler.delta_weight(layer, ad.A, ad.B)
        if isinstance(layer, nn.Embedding):  # PEFT's convention: one magnitude per embedding dim
            expected = ad.magnitude.view(1, -1) * new / new.norm(dim=0, keepdim=True)
        else:
            dims = tuple(range(1, new.dim()))
            norm = torch.linalg.vector_norm(new, dim=dims, keepdim=True)
            expected = ad.magnitude.reshape(-1, *[1] * (new.dim() - 1)) * new / norm
        lorakit.merge(model)
        torch.testing.assert_close(layer.weight, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_training_moves_factors_and_magnitude_only(case: Case) -> None:
    model, x, _ = _setup(case, init="kaiming")
    model.train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"layer.lora.default.{k}" for k in ("A", "B", "magnitude")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn_like(model(x))
    for _ in range(3):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        moved = not torch.equal(after[k], v)
        assert moved == k.endswith((".A", ".B", ".magnitude")), k


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_mixed_batch_is_refused(case: Case) -> None:
    model, x, _ = _setup(case)
    with pytest.raises(MixedBatchError, match=r"layer: adapters \['default'\] are DoRA adapters"):
        with lorakit.mixed_batch(model, ["default"] * x.shape[0]):
            pass


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_save_load_round_trip_and_copies(case: Case, tmp_path: Path) -> None:
    model, x, _ = _setup(case)
    with torch.no_grad():
        out = model(x)
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = case.build().eval()
    report = load_adapter(fresh, tmp_path)
    assert report.complete
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(clone(x), out)


@pytest.mark.parametrize("case", DORA_CASES, ids=DORA_IDS)
def test_with_a_plain_adapter_merged_equals_unmerged(case: Case) -> None:
    """A plain and a DoRA adapter live together (PEFT's order: each acts on the running output)."""
    model, x, _ = _setup(case, name="d")
    torch.manual_seed(1)
    lorakit.inject(model, LoraConfig(r=case.r, alpha=5.0, targets=["layer"], init="random", **case.config), "p")
    w0 = model.layer.weight.detach().clone()
    for order in (["p", "d"], ["d", "p"]):
        lorakit.set_adapter(model, order)
        with torch.no_grad():
            unmerged = model(x)
            lorakit.merge(model)
            assert _rel(model(x), unmerged) < 1e-5
            lorakit.unmerge(model)
            assert torch.equal(model.layer.weight, w0)


@pytest.mark.parametrize("case", GROUPED, ids=[c.id for c in GROUPED])
def test_grouped_convs_are_refused_naming_why(case: Case) -> None:
    model = case.build()
    with pytest.raises(TargetError, match=r"layer: DoRA on a grouped Conv2d \(groups=\d\) is refused"):
        lorakit.inject(model, LoraConfig(r=case.r, targets=["layer"], dora=True))
    assert not isinstance(model.layer, lorakit.LoraLayer)


class Toy(nn.Linear):
    """A layer type with a handler that has no DoRA hooks."""


class ToyHandler(lorakit.LayerHandler):
    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, 3), (2, r)


def test_layer_types_without_dora_are_refused_at_inject() -> None:
    lorakit.register(Toy, ToyHandler())
    model = Net(Toy(3, 2))
    with pytest.raises(TargetError, match=r"layer: DoRA is not implemented for layer type Toy \(ToyHandler\)"):
        lorakit.inject(model, LoraConfig(targets=["layer"], dora=True))


def test_plain_lora_keeps_its_own_forward() -> None:
    """Plain adapters never take the variant path (the fused Linear node stays theirs)."""
    model = Net(nn.Linear(6, 5))
    lorakit.inject(model, LoraConfig(targets=["layer"], init="random"))
    model.train()
    y = model(torch.randn(3, 6))
    assert model.layer._lora_plain and type(y.grad_fn).__name__ == "LoraLinearFnBackward"


def test_combine_hotswap_and_additive_delta_refuse_dora(tmp_path: Path) -> None:
    """What assumes an added delta or two factors only refuses DoRA adapters by name, changing nothing."""
    case = DORA_CASES[0]
    model, x, _ = _setup(case, name="d")
    save_adapter(model, tmp_path, "d")
    with pytest.raises(lorakit.ConfigError, match=r"combine_adapters: \['d'\] are DoRA adapters"):
        lorakit.combine_adapters(model, ["d"], new_name="c")
    with pytest.raises(lorakit.AdapterConfigError, match=r"hot-swapping DoRA adapters is not implemented"):
        lorakit.hotswap_adapter(model, tmp_path, "d")
    with pytest.raises(lorakit.ConfigError, match=r"adapter 'd' is a dora adapter: its merge is not an added delta"):
        model.layer.lora_delta(("d",))
    assert lorakit.list_adapters(model) == ["d"]


def test_nonfinite_magnitude_refused_by_merge_and_save(tmp_path: Path) -> None:
    model, _, _ = _setup(DORA_CASES[0])
    w0 = model.layer.weight.detach().clone()
    with torch.no_grad():
        model.layer.lora["default"].magnitude[0] = float("nan")
    with pytest.raises(lorakit.NonFiniteError, match=r"layer\.lora\.default\.magnitude"):
        lorakit.merge(model)
    assert torch.equal(model.layer.weight, w0) and model.layer.lora_merged == ()
    with pytest.raises(lorakit.NonFiniteError, match=r"layer\.lora\.default\.magnitude holds NaN"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_plain_merges_keep_their_numbers(case: Case) -> None:
    """The variant seam merges runs of plain adapters as lorakit always has, ``W0 + (0 + d1 + d2)``, bitwise."""
    torch.manual_seed(0)
    model = case.build()
    for name, alpha in (("a", 3.0), ("b", 5.0)):
        lorakit.inject(model, LoraConfig(r=case.r, alpha=alpha, targets=["layer"], init="random", **case.config), name)
    layer = model.layer
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        total = torch.zeros_like(w0, dtype=torch.float32)
        for n in ("a", "b"):
            ad = layer.lora[n]
            total += ad.scaling.float() * layer.lora_handler.delta_weight(layer, ad.A.float(), ad.B.float())
        lorakit.merge(model, ["a", "b"])
    assert torch.equal(layer.weight, (w0.float() + total).to(w0.dtype))
