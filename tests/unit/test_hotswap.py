"""hotswap_adapter / prepare_hotswap: a swap equals a fresh load, in place; and 1,000 load/switch/unload cycles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.hotswap import hotswap_adapter, prepare_hotswap
from lorakit.io_errors import AdapterConfigError, KeyMismatchError
from lorakit.layers import LoraAdapter

from .io_models import IDS, config, make_net, state_hash

torch.set_num_threads(1)
LAYERS = ("emb", "conv", "gconv", "lin")


def saved(tmp: Path, tag: str, seed: int, **kw: object) -> Path:
    """Save a random adapter (random A and B, alpha 6 != r unless given) on make_net(0); return its folder."""
    m = make_net(0)
    torch.manual_seed(1000 + seed)
    lorakit.inject(m, config(**kw))
    return lorakit.save_adapter(m, tmp / tag)


def fresh(folder: Path) -> nn.Module:
    m = make_net(0)
    lorakit.load_adapter(m, folder)
    return m


def adapter(m: nn.Module, path: str, name: str = "default") -> LoraAdapter:
    ad = m.get_submodule(path).lora[name]
    assert isinstance(ad, LoraAdapter)
    return ad


def base_hash(m: nn.Module) -> list[bytes]:
    return [m.get_submodule(p).weight.detach().numpy().tobytes() for p in (*LAYERS, "head")]


def test_same_rank_copies_into_the_same_parameters(tmp_path: Path) -> None:
    f1 = saved(tmp_path, "a", 0)
    f2 = saved(tmp_path, "b", 1, alpha=3)
    m = fresh(f1)
    before = m(IDS)
    params = {p: (adapter(m, p).A, adapter(m, p).B, adapter(m, p).scaling) for p in LAYERS}
    base = base_hash(m)
    report = hotswap_adapter(m, f2)
    assert set(report.layers) == set(LAYERS) and not (report.padded or report.grown or report.zeroed)
    out = m(IDS)
    assert not torch.allclose(out, before)  # the swap did something
    torch.testing.assert_close(out, fresh(f2)(IDS), rtol=0, atol=0)
    for p in LAYERS:
        ad = adapter(m, p)
        # same objects: optimizers and compiled graphs stay valid
        assert ad.A is params[p][0] and ad.B is params[p][1] and ad.scaling is params[p][2]
        assert ad.A.requires_grad and ad.B.requires_grad
        assert float(ad.scaling) == pytest.approx(3 / 4) and ad.alpha == 3
    assert base_hash(m) == base  # base weights untouched
    # the swapped adapter saves to a file equal (in outputs) to the one it came from
    lorakit.save_adapter(m, tmp_path / "again")
    torch.testing.assert_close(fresh(tmp_path / "again")(IDS), fresh(f2)(IDS), rtol=0, atol=0)


def test_requires_grad_is_kept_for_an_inactive_adapter(tmp_path: Path) -> None:
    f1, f2 = saved(tmp_path, "a", 0), saved(tmp_path, "b", 1)
    m = fresh(f1)
    lorakit.load_adapter(m, f2, "other")  # now "default" is inactive and frozen
    assert not adapter(m, "lin").A.requires_grad
    hotswap_adapter(m, f2, "default")
    assert not adapter(m, "lin").A.requires_grad and not adapter(m, "lin").B.requires_grad
    assert lorakit.active_adapters(m) == ("other",)
    lorakit.set_adapter(m, "default")
    torch.testing.assert_close(m(IDS), fresh(f2)(IDS), rtol=0, atol=0)


def test_smaller_rank_pads_in_place_and_equals_a_fresh_load(tmp_path: Path) -> None:
    f4 = saved(tmp_path, "r4", 0)
    f2 = saved(tmp_path, "r2", 1, r=2, alpha=5)  # gconv has groups=2: padding is per group
    m = fresh(f4)
    params = {p: (adapter(m, p).A, adapter(m, p).B) for p in LAYERS}
    shapes = {p: (adapter(m, p).A.shape, adapter(m, p).B.shape) for p in LAYERS}
    report = hotswap_adapter(m, f2)
    assert set(report.padded) == set(LAYERS) and not report.grown
    for p in LAYERS:
        ad = adapter(m, p)
        assert ad.A is params[p][0] and ad.B is params[p][1] and (ad.A.shape, ad.B.shape) == shapes[p]
        assert ad.r == 4 and float(ad.scaling) == pytest.approx(5 / 2)
    torch.testing.assert_close(m(IDS), fresh(f2)(IDS), rtol=1e-6, atol=1e-6)
    # a padded adapter saves as an equivalent rank-4 file
    lorakit.save_adapter(m, tmp_path / "padded")
    torch.testing.assert_close(fresh(tmp_path / "padded")(IDS), fresh(f2)(IDS), rtol=1e-6, atol=1e-6)


def test_larger_rank_grows_the_same_parameter_objects(tmp_path: Path) -> None:
    f2 = saved(tmp_path, "r2", 0, r=2)
    f6 = saved(tmp_path, "r6", 1, r=6, alpha=2)
    m = fresh(f2)
    objs = {p: (adapter(m, p).A, adapter(m, p).B) for p in LAYERS}
    report = hotswap_adapter(m, f6)
    assert set(report.grown) == set(LAYERS)
    for p in LAYERS:
        ad = adapter(m, p)
        assert ad.A is objs[p][0] and ad.B is objs[p][1] and ad.A.shape[0] == 6 and ad.r == 6
        assert isinstance(ad.A, nn.Parameter) and ad.A.requires_grad
    torch.testing.assert_close(m(IDS), fresh(f6)(IDS), rtol=0, atol=0)


def test_prepare_hotswap_pads_without_changing_outputs(tmp_path: Path) -> None:
    f2, f6 = saved(tmp_path, "r2", 0, r=2), saved(tmp_path, "r6", 1, r=6)
    m = fresh(f2)
    before = m(IDS)
    assert set(prepare_hotswap(m, "default", 8)) == set(LAYERS)
    assert adapter(m, "gconv").A.shape[0] == 8
    torch.testing.assert_close(m(IDS), before, rtol=1e-6, atol=1e-6)
    objs = {p: (adapter(m, p).A, adapter(m, p).B) for p in LAYERS}
    report = hotswap_adapter(m, f6)
    assert set(report.padded) == set(LAYERS) and not report.grown
    assert all(adapter(m, p).A is objs[p][0] and adapter(m, p).B is objs[p][1] for p in LAYERS)
    torch.testing.assert_close(m(IDS), fresh(f6)(IDS), rtol=1e-6, atol=1e-6)
    with pytest.raises(lorakit.TargetError, match="multiple of groups"):
        prepare_hotswap(m, "default", 9)


def test_a_file_covering_fewer_layers_zeroes_the_rest(tmp_path: Path) -> None:
    full = saved(tmp_path, "full", 0)
    part = saved(tmp_path, "part", 1, targets=["lin"])
    m = fresh(full)
    report = hotswap_adapter(m, part)
    assert report.layers == ("lin",) and set(report.zeroed) == {"emb", "conv", "gconv"}
    assert float(adapter(m, "conv").B.detach().abs().sum()) == 0.0
    torch.testing.assert_close(m(IDS), fresh(part)(IDS), rtol=0, atol=0)


def test_extra_layers_raise_and_leave_the_model_unchanged(tmp_path: Path) -> None:
    part = saved(tmp_path, "part", 0, targets=["lin"])
    full = saved(tmp_path, "full", 1)
    m = fresh(part)
    h = state_hash(m)
    with pytest.raises(AdapterConfigError, match="never adds layers"):
        hotswap_adapter(m, full)
    assert state_hash(m) == h
    with pytest.raises(lorakit.AdapterNotFoundError):
        hotswap_adapter(m, part, "nope")


def test_state_dict_input_missing_and_extra_keys(tmp_path: Path) -> None:
    import json

    import safetensors.torch

    f1, f2 = saved(tmp_path, "a", 0), saved(tmp_path, "b", 1)
    state = safetensors.torch.load((f2 / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((f2 / "adapter_config.json").read_text())
    m = fresh(f1)
    hotswap_adapter(m, state, config=cfg)
    torch.testing.assert_close(m(IDS), fresh(f2)(IDS), rtol=0, atol=0)

    h = state_hash(m)
    extra = {**state, "base_model.model.head.lora_A.weight": torch.zeros(4, 6)}
    with pytest.raises(KeyMismatchError, match="unexpected"):
        hotswap_adapter(m, extra, config=cfg, strict=False)  # extra keys raise even when not strict
    key = "base_model.model.lin.lora_B.weight"
    short = {k: v for k, v in state.items() if k != key}
    with pytest.raises(KeyMismatchError, match="missing"):
        hotswap_adapter(m, short, config=cfg)
    assert state_hash(m) == h
    report = hotswap_adapter(m, short, config=cfg, strict=False)
    assert report.missing == (key,) and report.zeroed == ("lin",)
    assert float(adapter(m, "lin").A.detach().abs().sum()) == 0.0
    with pytest.raises(lorakit.ConfigError, match="config="):
        hotswap_adapter(m, state)


def test_merged_adapter_is_remerged_and_unmerge_restores_the_base(tmp_path: Path) -> None:
    f1, f2 = saved(tmp_path, "a", 0), saved(tmp_path, "b", 1)
    pristine = base_hash(make_net(0))
    m = fresh(f1)
    lorakit.merge(m)
    hotswap_adapter(m, f2)
    ref = fresh(f2)
    torch.testing.assert_close(m(IDS), ref(IDS), rtol=1e-5, atol=1e-5)
    lorakit.unmerge(m)
    assert base_hash(m) == pristine
    torch.testing.assert_close(m(IDS), ref(IDS), rtol=0, atol=0)


def test_compiled_model_sees_the_swap_without_recompiling(tmp_path: Path) -> None:
    # The default inductor backend needs ~30 s of C++ compilation on this 2-core CPU, so the
    # test uses aot_eager: the same Dynamo graph capture and guards (which decide whether a
    # swap forces a recompile), without code generation.
    f4, f2 = saved(tmp_path, "r4", 0), saved(tmp_path, "r2", 1, r=2, alpha=7)
    f4b = saved(tmp_path, "r4b", 2, alpha=2)
    m = fresh(f4)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    start = time.perf_counter()
    with torch.no_grad():
        compiled(IDS)
    if time.perf_counter() - start > 60:
        pytest.skip("torch.compile took more than 60 s on this machine")
    try:
        for folder in (f4b, f2):
            hotswap_adapter(m, folder)
            with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
                out = compiled(IDS)
            torch.testing.assert_close(out, fresh(folder)(IDS), rtol=1e-6, atol=1e-6)
        # a larger rank changes the tensors' shapes: the graph is stale, as documented
        hotswap_adapter(m, saved(tmp_path, "r6", 3, r=6))
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError):
            compiled(IDS)
    finally:
        torch._dynamo.reset()


# -- reliability item 13: 1,000 load / switch / unload cycles -------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_1000_load_switch_unload_cycles_leave_the_base_bitwise_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Tiny().eval()
    pristine = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6)
    base_out = m(x)
    folders = []
    for i, r in enumerate((2, 3)):
        torch.manual_seed(10 + i)
        lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=5, targets=["a", "b"], init="random"), f"s{i}")
        folders.append(lorakit.save_adapter(m, tmp_path / f"s{i}", f"s{i}"))
        lorakit.delete_adapter(m, f"s{i}")
    outs = []
    for cycle in range(1000):
        lorakit.load_adapter(m, folders[0], "x")
        lorakit.load_adapter(m, folders[1], "y")
        for name in ("x", "y", "x", "y"):
            lorakit.set_adapter(m, name)
        if cycle % 100 == 0:
            lorakit.merge(m)
            outs.append(m(x))
            lorakit.unmerge(m)
        lorakit.delete_adapter(m, "x")
        lorakit.delete_adapter(m, "y")
    assert not list(lorakit.lora_layers(m)) and type(m.a) is nn.Linear
    assert m.state_dict().keys() == pristine.keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, pristine[k]) and v.numpy().tobytes() == pristine[k].numpy().tobytes(), k
    assert torch.equal(m(x), base_out)
    assert not torch.allclose(outs[0], base_out)  # the adapters did change the outputs while loaded
    assert all(torch.equal(o, outs[0]) for o in outs)
