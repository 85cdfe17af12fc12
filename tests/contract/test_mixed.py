"""Mixed batches: each sample's output equals running it with its own adapter alone."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import LoraConfig

from .cases import CASES, IDS, Case

NAMES = ["a", None, "b", "c", "a", "c", None, "b"]


def _model_with_three_adapters(case: Case):
    torch.manual_seed(0)
    model = case.build().eval()
    for name, r, alpha in [("a", case.r, 3.0), ("b", 2 * case.r, 5.0), ("c", case.r, 1.5)]:
        cfg = LoraConfig(r=r, alpha=alpha, targets=["layer"], init="random", **case.config)
        lorakit.inject(model, cfg, name)
    return model.eval()


def _batch(case: Case, n: int) -> torch.Tensor:
    torch.manual_seed(1)
    parts = []
    while sum(p.shape[0] for p in parts) < n:
        parts.append(case.make_input())
    return torch.cat(parts)[:n]


def _alone(model: torch.nn.Module, x: torch.Tensor, i: int, name: str | None) -> torch.Tensor:
    """Sample ``i`` run by itself with adapter ``name`` (``None``: the base model)."""
    if name is None:
        with lorakit.disabled(model):
            return model(x[i : i + 1])
    lorakit.set_adapter(model, name)
    return model(x[i : i + 1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mixed_batch_equals_per_sample(case: Case) -> None:
    model = _model_with_three_adapters(case)
    x = _batch(case, len(NAMES))
    with torch.no_grad():
        with lorakit.mixed_batch(model, NAMES):
            mixed = model(x)
        for i, name in enumerate(NAMES):
            alone = _alone(model, x, i, name)
            scale = alone.abs().max().clamp_min(1e-6)
            assert float((mixed[i : i + 1] - alone).abs().max() / scale) < 1e-5, (i, name)
    # the adapters really differ, so a mix-up would show
    lorakit.set_adapter(model, "a")
    ya = model(x[:1])
    lorakit.set_adapter(model, "b")
    assert not torch.allclose(ya, model(x[:1]))


SKEWED = ["a", "a", "a", "a", "a", None, "b", "c"]  # a needs two grid rows, b and c are padded
ONE = ["c", None, "c", None]


@pytest.mark.parametrize("names", [NAMES, SKEWED, ONE], ids=["balanced", "skewed", "one-adapter"])
@pytest.mark.parametrize("seq", [0, 1, 7])  # 0: 2-D input (N, in)
def test_linear_mixed_forms_equal_per_sample(names: list[str | None], seq: int) -> None:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).eval()
    # c only on the first layer: the second has a missing slot (and nothing at all for ONE)
    for name, r, targets in [("a", 2, ["0", "2"]), ("b", 4, ["0", "2"]), ("c", 3, ["0"])]:
        lorakit.inject(model, LoraConfig(r=r, alpha=2.0 * r, targets=targets, init="random"), name)
    x = torch.randn(len(names), seq, 6) if seq else torch.randn(len(names), 6)
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            mixed = model(x)
            plan, second = model[0]._lora_mixed, model[2]._lora_mixed
        assert (plan.A_cat is not None) == (names is ONE)
        assert (second.grid is None and second.A_cat is None) == (names is ONE)  # c alone: nothing to add
        for i, name in enumerate(names):
            alone = _alone(model, x, i, name)
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_grid_groups_samples_by_adapter() -> None:
    from lorakit.mixed import _grid

    # slots: 0 (five samples), 1, 2 (one each), 3 = no adapter; balanced size ceil(7/3) = 3
    index = torch.tensor([0, 0, 1, 0, 3, 0, 2, 0])
    grid = _grid(index, 3)
    assert (grid.rows, grid.size) == (4, 3)
    assert grid.slot.tolist() == [0, 0, 1, 2]
    rows = grid.samples.view(4, 3).tolist()
    keep = grid.keep.view(4, 3).tolist()
    real = [[s for s, k in zip(r, kr, strict=True) if k] for r, kr in zip(rows, keep, strict=True)]
    assert real == [[0, 1, 3], [5, 7], [2], [6]]
    assert _grid(torch.tensor([1, 0, 1, 0]), 2).keep is None  # balanced: no padding


def test_mixed_batch_errors() -> None:
    case = CASES[0]
    model = _model_with_three_adapters(case)
    x = _batch(case, 4)
    with pytest.raises(lorakit.AdapterNotFoundError, match="zzz"):
        with lorakit.mixed_batch(model, ["a", "zzz", None, "b"]):
            pass
    with pytest.raises(lorakit.MixedBatchError, match="4 adapter names but the batch has 3"):
        with lorakit.mixed_batch(model, ["a", "b", None, "c"]):
            model(x[:3])
    model.train()
    with pytest.raises(lorakit.MixedBatchError, match=r"model.eval\(\)"):
        with lorakit.mixed_batch(model, ["a"] * 4):
            pass
    model.eval()
    lorakit.merge(model, "a")
    with pytest.raises(lorakit.MixedBatchError, match="merged"):
        with lorakit.mixed_batch(model, ["a"] * 4):
            pass
    lorakit.unmerge(model)
    # after the block (also after an error inside it) the normal path is back
    with pytest.raises(lorakit.MixedBatchError):
        with lorakit.mixed_batch(model, ["b"] * 4):
            model(x[:2])
    lorakit.set_adapter(model, "a")
    with torch.no_grad():
        y1 = model(x)
        with lorakit.mixed_batch(model, ["a"] * 4):
            y2 = model(x)
    assert torch.allclose(y1, y2, atol=1e-6)
