"""combine_adapters: "cat" is exact, "svd" is exact at full rank and optimal (Eckart-Young) below it,
"linear" matches PEFT, and a combined adapter saves and loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.combine import combine_adapters

from .io_models import IDS, config, make_net, state_hash

torch.set_num_threads(1)
LAYERS = ("emb", "conv", "gconv", "lin")  # gconv has groups=2
W = (0.7, -1.3)


def two_adapters() -> nn.Module:
    """Net with "a" (r=4, alpha 6, every layer) and "b" (r=2, rsLoRA, alpha 3, no emb; lin at r=6)."""
    m = make_net(0)
    torch.manual_seed(1)
    lorakit.inject(m, config(), "a")
    torch.manual_seed(2)
    lorakit.inject(
        m,
        config(r=2, alpha=3, use_rslora=True, targets=["conv", "gconv", "lin"], rank_pattern={"lin": 6}),
        "b",
    )
    return m


def deltas(m: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """W_merged - W0 per layer, through lorakit.merge (independent of combine's code)."""
    w0 = {p: m.get_submodule(p).weight.detach().clone() for p in LAYERS}
    lorakit.merge(m, name)
    out = {p: m.get_submodule(p).weight.detach().double() - w0[p].double() for p in LAYERS}
    lorakit.unmerge(m)
    return out


def target(m: nn.Module, weights: tuple[float, ...] = W) -> dict[str, torch.Tensor]:
    da, db = deltas(m, "a"), deltas(m, "b")
    return {p: weights[0] * da[p] + weights[1] * db[p] for p in LAYERS}


def matrices(p: str, d: torch.Tensor) -> torch.Tensor:
    """The matrices whose singular values Eckart-Young is about: one per conv group."""
    if p == "gconv":
        return d.reshape(2, 4, -1)
    return d.reshape(1, d.shape[0], -1)


def test_cat_is_exact_and_concatenates_ranks_within_groups() -> None:
    m = two_adapters()
    want = target(m)
    report = combine_adapters(m, ["a", "b"], W, "c", method="cat")
    got = deltas(m, "c")
    for p in LAYERS:
        torch.testing.assert_close(got[p], want[p], rtol=1e-5, atol=1e-5 * float(want[p].abs().max()))
    ranks = {t.path: t.r for t in report.layers}
    assert ranks == {"emb": 4, "conv": 6, "gconv": 6, "lin": 10}
    assert max(t.error for t in report.layers) < 1e-5
    # weights 1, 1: the combined adapter alone computes what both active adapters compute
    combine_adapters(m, ["a", "b"], None, "ones")
    lorakit.set_adapter(m, ["a", "b"])
    both = m(IDS)
    lorakit.set_adapter(m, "ones")
    torch.testing.assert_close(m(IDS), both, rtol=1e-5, atol=1e-5)


def test_new_adapter_is_added_inactive_and_frozen_and_sources_are_unchanged() -> None:
    m = two_adapters()
    lorakit.set_adapter(m, "a")
    h = {k: v.clone() for k, v in m.state_dict().items()}
    combine_adapters(m, ["a", "b"], W, "c")
    assert sorted(lorakit.list_adapters(m)) == ["a", "b", "c"] and lorakit.active_adapters(m) == ("a",)
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".lora.c." in n)
    assert all(torch.equal(v, h[k]) for k, v in m.state_dict().items() if k in h)


def test_svd_at_full_rank_equals_the_weighted_sum() -> None:
    m = two_adapters()
    want = target(m)
    combine_adapters(m, ["a", "b"], W, "s", method="svd", r=8)  # >= every layer's rank of the sum
    got = deltas(m, "s")
    for p in LAYERS:
        torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-5 * float(want[p].abs().max()))


def test_svd_below_full_rank_has_exactly_the_eckart_young_error() -> None:
    m = two_adapters()
    want = target(m)
    report = combine_adapters(m, ["a", "b"], W, "s", method="svd", r=2)
    got = deltas(m, "s")
    for p in LAYERS:
        rank = 2 // (2 if p == "gconv" else 1)
        sv = torch.linalg.svdvals(matrices(p, want[p]))  # (groups, k), descending
        discarded = float(sv[:, rank:].pow(2).sum().sqrt())
        error = float((got[p] - want[p]).norm())
        assert discarded > 1e-3  # rank 2 really truncates something
        assert error == pytest.approx(discarded, rel=1e-4), p
        reported = next(t for t in report.layers if t.path == p)
        assert reported.r == 2 and reported.error == pytest.approx(discarded, rel=1e-4)
    assert 0 < report.relative_error < 1


def test_svd_default_rank_is_the_largest_source_rank() -> None:
    m = two_adapters()
    report = combine_adapters(m, ["a", "b"], W, "s", method="svd")
    assert {t.path: t.r for t in report.layers} == {"emb": 4, "conv": 4, "gconv": 4, "lin": 6}


def test_linear_matches_peft_and_is_only_approximate() -> None:
    peft = pytest.importorskip("peft")

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    pm = peft.get_peft_model(
        MLP(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], init_lora_weights=False), "p1"
    )
    pm.add_adapter("p2", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["lin"], init_lora_weights=False))
    pm.add_weighted_adapter(["p1", "p2"], list(W), "pc", combination_type="linear")
    lin = pm.base_model.model.lin
    ours = MLP()
    for name, peft_name, alpha in (("a", "p1", 6), ("b", "p2", 2)):
        lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=alpha, targets=["lin"]), name)
        ad = ours.lin.lora[name]
        with torch.no_grad():
            ad.A.copy_(lin.lora_A[peft_name].weight)
            ad.B.copy_(lin.lora_B[peft_name].weight)
    report = combine_adapters(ours, ["a", "b"], W, "c", method="linear")
    peft_delta = lin.get_delta_weight("pc")
    ours_delta = ours.lin.lora["c"].B @ ours.lin.lora["c"].A * ours.lin.lora["c"].scaling
    torch.testing.assert_close(ours_delta.detach(), peft_delta.detach(), rtol=1e-5, atol=1e-6)
    assert report.layers[0].error > 1e-3 * report.layers[0].norm  # cross terms: not the weighted sum
    # one adapter: "linear" is exact
    one = combine_adapters(ours, ["a"], [-2.0], "one", method="linear")
    assert one.layers[0].error < 1e-5 * one.layers[0].norm


def test_linear_refuses_unequal_ranks_and_bad_arguments_change_nothing() -> None:
    m = two_adapters()
    h = state_hash(m)
    with pytest.raises(lorakit.ConfigError, match="equal ranks"):
        combine_adapters(m, ["a", "b"], W, "c", method="linear")
    with pytest.raises(lorakit.TargetError, match="multiple of groups"):
        combine_adapters(m, ["a", "b"], W, "c", method="svd", r=3)
    with pytest.raises(lorakit.ConfigError, match="only to method='svd'"):
        combine_adapters(m, ["a", "b"], W, "c", method="cat", r=4)
    with pytest.raises(lorakit.ConfigError, match="finite numbers"):
        combine_adapters(m, ["a", "b"], [1.0], "c")
    with pytest.raises(lorakit.ConfigError, match="finite numbers"):
        combine_adapters(m, ["a", "b"], [1.0, float("nan")], "c")
    with pytest.raises(lorakit.ConfigError, match="already exists"):
        combine_adapters(m, ["a", "b"], W, "b")
    with pytest.raises(lorakit.ConfigError, match="adapter name"):
        combine_adapters(m, ["a", "b"], W, "../x")
    with pytest.raises(lorakit.AdapterNotFoundError):
        combine_adapters(m, ["a", "zz"], W, "c")
    with pytest.raises(lorakit.ConfigError, match="method"):
        combine_adapters(m, ["a", "b"], W, "c", method="ties")
    assert state_hash(m) == h and lorakit.list_adapters(m) == ["a", "b"]


@pytest.mark.parametrize("method,r", [("cat", None), ("svd", 4)])
def test_combined_adapter_saves_and_loads(tmp_path: Path, method: str, r: int | None) -> None:
    m = two_adapters()
    combine_adapters(m, ["a", "b"], W, "c", method=method, r=r)
    lorakit.set_adapter(m, "c")
    want = m(IDS)
    lorakit.save_adapter(m, tmp_path / "c", "c")
    fresh = make_net(0)
    report = lorakit.load_adapter(fresh, tmp_path / "c")
    assert report.complete and set(report.layers) == set(LAYERS)
    torch.testing.assert_close(fresh(IDS), want, rtol=1e-6, atol=1e-6)
