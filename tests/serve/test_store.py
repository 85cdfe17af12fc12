"""The adapter store on its own: names that cannot leave the folder, the LRU budget with pinning and
in-use protection, reload of a changed folder and what a corrupt file does. Real adapter files of a tiny
model; the loader under test is a plain function (the servers' loaders are tested over HTTP)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.serve import (
    AdapterLoadError,
    AdapterNameError,
    AdapterStore,
    CacheFullError,
    UnknownAdapterError,
    content_version,
)


def _save(folder: Path, seed: int) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_types=("Linear",)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora["default"].B.normal_(generator=gen)
    return lorakit.save_adapter(model, folder)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    for i, name in enumerate(("a", "b", "c", "d")):
        _save(tmp_path / "store" / name, seed=i)
    return tmp_path / "store"


def _loader(loads: list[str]) -> object:
    def load(name: str, folder: Path) -> tuple[str, int]:
        loads.append(name)
        return f"{name}:{content_version(lorakit.read_adapter_files(folder))}", 100

    return load


def test_names_cannot_leave_the_store(store_dir: Path, tmp_path: Path) -> None:
    outside = _save(tmp_path / "outside", seed=9)
    (store_dir / "link").symlink_to(outside, target_is_directory=True)
    (store_dir / "inner").mkdir()
    (store_dir / "inner" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    store: AdapterStore[str] = AdapterStore(store_dir, _loader([]), budget_bytes=1000)  # type: ignore[arg-type]
    for bad in ("../outside", "..", ".", "/etc", str(outside), "a/../b", "a/b", "", ".hidden", 3, None):
        with pytest.raises(AdapterNameError):
            store.folder(bad)
    for escaping in ("link", "inner"):  # a symlinked folder, a symlinked file
        with pytest.raises(AdapterNameError, match="leads out of the store"):
            store.folder(escaping)
    with pytest.raises(UnknownAdapterError) as info:
        store.folder("zz")
    assert info.value.available == store.names() == ["a", "b", "c", "d"]  # the escaping names are not offered


def test_a_full_cache_never_evicts_pinned_or_in_use_adapters(store_dir: Path) -> None:
    loads: list[str] = []
    store: AdapterStore[str] = AdapterStore(store_dir, _loader(loads), budget_bytes=250, pinned=["a"])  # type: ignore[arg-type]
    store.preload()
    assert loads == ["a"]
    with store.use("b") as b:  # b in use: a (pinned) and b fill 200 of 250 bytes
        with pytest.raises(CacheFullError, match="needs 100 bytes"):
            with store.use("c"):
                pass
        assert b.value.startswith("b:") and set(store.snapshot().loaded) == {"a", "b"}
    with store.use("c"):  # b is free now: evicted, a stays
        pass
    snap = store.snapshot()
    assert set(snap.loaded) == {"a", "c"} and snap.evictions == 1 and snap.bytes == 200
    with store.use("a"), store.use("a"):  # hits, no reload
        pass
    assert loads == ["a", "b", "c", "c"]  # the refused c was loaded, then dropped; the retry loaded it again
    assert store.snapshot().hits == 2


def test_a_changed_folder_is_reloaded_and_in_flight_users_keep_their_version(store_dir: Path) -> None:
    dropped: list[str] = []
    store: AdapterStore[str] = AdapterStore(
        store_dir,
        _loader([]),
        budget_bytes=1000,
        unload=dropped.append,  # type: ignore[arg-type]
    )
    with store.use("a") as old:
        lorakit.copy_adapter(store_dir / "b", store_dir / "a")  # saved over while in use
        with store.use("a") as new:
            assert new.version == content_version(lorakit.read_adapter_files(store_dir / "b")) != old.version
            assert new.value == f"a:{new.version}" and old.value == f"a:{old.version}"  # neither changed
        assert dropped == []  # the old version is still in use
    assert dropped == [f"a:{old.version}"] and store.snapshot().reloads == 1


def test_a_corrupt_file_fails_its_requests_only(store_dir: Path) -> None:
    weights = store_dir / "c" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    store: AdapterStore[str] = AdapterStore(store_dir, _loader([]), budget_bytes=1000)  # type: ignore[arg-type]
    with pytest.raises(AdapterLoadError, match=r"adapter 'c' cannot be loaded: .*adapter_model.safetensors"):
        with store.use("c"):
            pass
    with store.use("d") as d:
        assert d.value.startswith("d:")
    assert store.snapshot().load_errors == 1


def test_concurrent_first_uses_load_once(store_dir: Path) -> None:
    loads: list[str] = []
    store: AdapterStore[str] = AdapterStore(store_dir, _loader(loads), budget_bytes=1000)  # type: ignore[arg-type]
    versions: list[str] = []

    def use() -> None:
        with store.use("b") as e:
            versions.append(e.version)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert loads == ["b"] and len(set(versions)) == 1 and len(versions) == 8
