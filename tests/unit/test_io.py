"""save_adapter / load_adapter: exact round trips, strictness, base-model check, rollback, atomic saves."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorakit
from lorakit import state
from lorakit.io import LoadReport, load_adapter, save_adapter
from lorakit.io_errors import (
    AdapterConfigError,
    AdapterFileError,
    BaseModelMismatchError,
    KeyMismatchError,
    ShapeMismatchError,
)
from lorakit.io_format import checksum

from .io_models import IDS, adapted_net, make_net, state_hash

torch.set_num_threads(1)
W = "adapter_model.safetensors"
C = "adapter_config.json"


def rewrite(folder: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None, **cfg: object) -> None:
    """Edit a saved adapter the way another tool would (no lorakit config hash)."""
    tensors = safetensors.torch.load((folder / W).read_bytes())
    meta = {"format": "pt"}
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    safetensors.torch.save_file(tensors, str(folder / W), metadata=meta)
    config = json.loads((folder / C).read_text())
    config.update(cfg)
    (folder / C).write_text(json.dumps(config))


def test_round_trip_is_bitwise_and_reproduces_outputs(tmp_path: Path) -> None:
    m = adapted_net(rank_pattern={"lin": 2}, alpha_pattern={"conv": 3.0}, use_rslora=True, train_modules=["head"])
    with torch.no_grad():
        m.head.weight.add_(0.25)  # a trained head travels with the adapter
    y = m(IDS)
    assert not torch.allclose(y, lorakit.unload(adapted_net(rank_pattern={"lin": 2}))(IDS))  # adapter is not a no-op
    save_adapter(m, tmp_path)
    m2 = make_net()
    report = load_adapter(m2, tmp_path)
    assert isinstance(report, LoadReport) and report.complete and report.base_checked and report.base_matches
    assert set(report.layers) == {"emb", "conv", "gconv", "lin"}
    assert torch.equal(m2(IDS), y)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert m2.lin.lora["default"].r == 2 and float(m2.conv.lora["default"].scaling) == pytest.approx(3.0 / 2.0)


def test_saved_files_are_peft_layout(tmp_path: Path) -> None:
    save_adapter(adapted_net(rank_pattern={"lin": 2}), tmp_path)
    cfg = json.loads((tmp_path / C).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 6
    assert cfg["target_modules"] == ["conv", "emb", "gconv", "lin"] and cfg["rank_pattern"] == {"lin": 2}
    assert (tmp_path / C).read_text() == json.dumps(cfg, indent=2, sort_keys=True)
    shapes = {k: tuple(v.shape) for k, v in safetensors.torch.load((tmp_path / W).read_bytes()).items()}
    assert shapes == {
        "base_model.model.emb.lora_embedding_A": (4, 20),
        "base_model.model.emb.lora_embedding_B": (8, 4),
        "base_model.model.conv.lora_A.weight": (4, 8, 3, 3),
        "base_model.model.conv.lora_B.weight": (8, 4, 1, 1),
        "base_model.model.gconv.lora_A.weight": (4, 8, 3, 3),  # dense, as PEFT expects
        "base_model.model.gconv.lora_B.weight": (8, 2, 1, 1),
        "base_model.model.lin.lora_A.weight": (2, 8),
        "base_model.model.lin.lora_B.weight": (6, 2),
    }


def test_lora_only_bias_is_saved_and_restored(tmp_path: Path) -> None:
    m = adapted_net(bias="lora_only")
    with torch.no_grad():
        m.lin.bias.add_(1.0)
    save_adapter(m, tmp_path)
    keys = safetensors.torch.load((tmp_path / W).read_bytes()).keys()
    assert "base_model.model.lin.base_layer.bias" in keys and "base_model.model.head.bias" not in keys
    m2 = make_net()
    load_adapter(m2, tmp_path)
    assert torch.equal(m2.lin.bias, m.lin.bias) and torch.equal(m2(IDS), m(IDS))


def test_save_into_the_folder_it_was_loaded_from(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    m = make_net()
    load_adapter(m, tmp_path)
    with torch.no_grad():
        m.lin.lora["default"].B.mul_(-2.0)
    y = m(IDS)
    save_adapter(m, tmp_path)
    m2 = make_net()
    load_adapter(m2, tmp_path)
    assert torch.equal(m2(IDS), y)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C, W]  # no temp files left


def test_merged_model_saves_its_pristine_base_fingerprint(tmp_path: Path) -> None:
    m = adapted_net()
    y = m(IDS)
    lorakit.merge(m)
    save_adapter(m, tmp_path)
    m2 = make_net()
    load_adapter(m2, tmp_path)  # would raise BaseModelMismatchError if the merged weight were fingerprinted
    assert torch.allclose(m2(IDS), y, atol=1e-5)


def test_other_base_is_refused_and_model_unchanged(tmp_path: Path) -> None:
    save_adapter(adapted_net(seed=0), tmp_path)
    other = make_net(seed=1)  # same shapes, other weights
    before = state_hash(other)
    with pytest.raises(BaseModelMismatchError) as err:
        load_adapter(other, tmp_path)
    assert str(tmp_path / W) in str(err.value) and "lin" in str(err.value) and "allow_other_base" in str(err.value)
    assert state_hash(other) == before and lorakit.list_adapters(other) == []
    with pytest.warns(UserWarning, match="different base model"):
        report = load_adapter(other, tmp_path, allow_other_base=True)
    assert report.base_checked and report.base_matches is False and not report.complete


def test_base_check_needs_every_byte_and_reads_older_sha256_fingerprints(tmp_path: Path) -> None:
    """The CRC-32 sees a change of one element (which the 16 samples miss), and a file
    written before the switch to CRC-32 (sha256 fingerprints) is still checked."""
    save_adapter(adapted_net(seed=0), tmp_path)
    raw = safetensors.torch.load((tmp_path / W).read_bytes())
    with open(tmp_path / W, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    base = json.loads(meta["lorakit_base"])
    assert all(set(fp) == {"dtype", "shape", "crc32", "samples", "norm"} for fp in base.values())

    nudged = make_net(seed=0)
    with torch.no_grad():
        nudged.lin.weight.view(-1)[1] += 1e-3  # not one of the sampled positions
    with pytest.raises(BaseModelMismatchError):
        load_adapter(nudged, tmp_path)

    def older(sha_of: torch.nn.Module) -> None:
        for path, fp in base.items():
            fp.pop("crc32", None)
            fp["sha256"] = checksum(sha_of.get_submodule(path).weight)
        safetensors.torch.save_file(raw, tmp_path / W, metadata={**meta, "lorakit_base": json.dumps(base)})

    older(make_net(seed=0))
    assert load_adapter(make_net(seed=0), tmp_path).base_matches
    older(make_net(seed=1))
    with pytest.raises(BaseModelMismatchError):
        load_adapter(make_net(seed=0), tmp_path)


def test_base_check_tolerates_a_dtype_cast_of_the_same_weights(tmp_path: Path) -> None:
    save_adapter(adapted_net(seed=0), tmp_path)
    report = load_adapter(make_net(seed=0).to(torch.bfloat16), tmp_path)
    assert report.base_matches
    with pytest.raises(BaseModelMismatchError):
        load_adapter(make_net(seed=1).to(torch.bfloat16), tmp_path)


def test_loading_an_existing_name_is_refused(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    m = make_net()
    load_adapter(m, tmp_path)
    before = state_hash(m)
    with pytest.raises(lorakit.ConfigError, match="already has it") as err:
        load_adapter(m, tmp_path)
    assert str(tmp_path) in str(err.value) and state_hash(m) == before
    load_adapter(m, tmp_path, name="second")
    assert lorakit.list_adapters(m) == ["default", "second"]


def test_missing_and_unexpected_keys_strict_and_report(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    rewrite(
        tmp_path, drop="base_model.model.lin.lora_B.weight", add={"base_model.model.nope.lora_A.weight": torch.ones(2)}
    )
    m = make_net()
    before = state_hash(m)
    with pytest.raises(KeyMismatchError) as err:
        load_adapter(m, tmp_path)
    assert err.value.missing == ["base_model.model.lin.lora_B.weight"]
    assert err.value.unexpected == ["base_model.model.nope.lora_A.weight"]
    assert str(tmp_path / W) in str(err.value) and state_hash(m) == before
    report = load_adapter(m, tmp_path, strict=False)
    assert report.missing == ("base_model.model.lin.lora_B.weight",) and not report.complete
    assert report.base_checked is False  # an edited file carries no lorakit fingerprint


def test_zero_matched_keys_always_raise(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    tensors = safetensors.torch.load((tmp_path / W).read_bytes())
    renamed = {k.replace("base_model.model.", ""): v for k, v in tensors.items()}  # prefix lost
    safetensors.torch.save_file(renamed, str(tmp_path / W))
    with pytest.raises(KeyMismatchError, match="no tensor in the file matches"):
        load_adapter(make_net(), tmp_path, strict=False)


def test_config_rank_must_agree_with_tensors(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    rewrite(tmp_path, r=8, rank_pattern={})
    m = make_net()
    before = state_hash(m)
    with pytest.raises(ShapeMismatchError) as err:
        load_adapter(m, tmp_path)
    assert err.value.expected[0] == 8 and err.value.actual[0] == 4 and "rank" in str(err.value)
    assert str(tmp_path / W) in str(err.value) and state_hash(m) == before


def test_config_targets_must_exist_in_the_model(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    rewrite(tmp_path, target_modules=["emb", "conv", "gconv", "lin", "decoder"])
    m = make_net()
    # 'decoder' matches nothing, but the other four do: the adapter's keys still all match
    load_adapter(m, tmp_path)
    rewrite(tmp_path, target_modules=["decoder"])
    with pytest.raises(AdapterConfigError, match="does not fit this model") as err:
        load_adapter(make_net(), tmp_path)
    assert str(tmp_path / C) in str(err.value)


def test_edited_config_is_detected(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    cfg = json.loads((tmp_path / C).read_text())
    cfg["lora_alpha"] = 60
    (tmp_path / C).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="does not belong") as err:
        load_adapter(make_net(), tmp_path)
    assert str(tmp_path / C) in str(err.value)


def test_failure_after_inject_rolls_back_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_adapter(adapted_net(train_modules=["head"]), tmp_path)
    m = make_net(seed=0)
    torch.manual_seed(5)
    lorakit.inject(m, lorakit.LoraConfig(r=2, targets=["lin"], init="random"), "other")
    with torch.no_grad():
        m.head.weight.mul_(3.0)
    before, y = state_hash(m), m(IDS)
    import lorakit.io as io_mod

    def boom(model: torch.nn.Module) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io_mod, "lora_layers", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_adapter(m, tmp_path)
    assert state_hash(m) == before and torch.equal(m(IDS), y)
    assert lorakit.list_adapters(m) == ["other"] and lorakit.active_adapters(m) == ("other",)
    assert "default" not in state.configs(m)


def test_save_errors(tmp_path: Path) -> None:
    m = adapted_net()
    with pytest.raises(lorakit.AdapterNotFoundError, match=str(tmp_path)):
        save_adapter(m, tmp_path, name="nope")
    with torch.no_grad():
        m.lin.lora["default"].B[0, 0] = float("nan")
    with pytest.raises(lorakit.NonFiniteError, match="lin"):
        save_adapter(m, tmp_path)
    assert not (tmp_path / W).exists()


def test_extra_metadata_round_trips_and_reserved_keys_are_refused(tmp_path: Path) -> None:
    m = adapted_net()
    save_adapter(m, tmp_path, metadata={"my_integration": '{"names": ["a"]}'})
    files = lorakit.io.read_adapter_files(tmp_path)
    assert files.metadata["my_integration"] == '{"names": ["a"]}' and "lorakit_checksums" in files.metadata
    load_adapter(make_net(), tmp_path)  # still a valid adapter
    before = (tmp_path / W).read_bytes()
    for bad in ({"lorakit_version": "9"}, {"format": "np"}, {"k": 1}):
        with pytest.raises(lorakit.ConfigError, match="reserved or not str"):
            save_adapter(m, tmp_path, metadata=bad)  # type: ignore[dict-item]
    assert (tmp_path / W).read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_keeps_previous_adapter(tmp_path: Path) -> None:
    save_adapter(adapted_net(seed=0), tmp_path)
    old = (tmp_path / W).read_bytes()
    m = adapted_net(seed=0)
    with torch.no_grad():
        m.lin.lora["default"].B.add_(1)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OSError) as err:
            save_adapter(m, tmp_path)
        assert str(tmp_path / W) in str(err.value)
    finally:
        tmp_path.chmod(0o755)
    assert (tmp_path / W).read_bytes() == old


def test_failed_write_keeps_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_adapter(adapted_net(seed=0), tmp_path)
    old = (tmp_path / W).read_bytes()
    m = adapted_net(seed=0)
    with torch.no_grad():
        m.lin.lora["default"].B.add_(1)

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        save_adapter(m, tmp_path)
    monkeypatch.undo()
    assert str(tmp_path / W) in str(err.value)
    assert (tmp_path / W).read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == [C, W]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file"):
        save_adapter(m, tmp_path / "file" / "sub")


_SAVER = textwrap.dedent(
    """
    import os, sys
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    import lorakit
    from lorakit.io import save_adapter
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    lorakit.inject(m, lorakit.LoraConfig(r=64, alpha=32, targets=["0", "1"], init="random"))
    print("ready", flush=True)
    k = 0
    while True:
        k += 1
        with torch.no_grad():
            for layer in (m[0], m[1]):
                layer.lora["default"].B.fill_(float(k))
        save_adapter(m, sys.argv[1])
    """
)


def test_killed_save_leaves_a_complete_adapter(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        proc.wait()
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_adapter(m, folder)  # complete, checksums and fingerprint verified
        b0, b1 = m[0].lora["default"].B.detach(), m[1].lora["default"].B.detach()
        assert float(b0[0, 0]) >= 1 and torch.all(b0 == b0[0, 0]) and torch.equal(b0, b1)  # one whole save


def test_given_base_fingerprints_write_the_same_file_and_must_fit(tmp_path: Path) -> None:
    """A training run fingerprints its frozen base once and passes it to every save: the file is the
    one a save that reads the base itself writes; fingerprints of other weights are refused by name."""
    from lorakit.errors import ConfigError
    from lorakit.io import base_fingerprints

    m = adapted_net()
    given = base_fingerprints(m)
    assert set(given) == {"emb", "conv", "gconv", "lin"}
    save_adapter(m, tmp_path / "read")
    save_adapter(m, tmp_path / "given", base_fingerprints=given)
    for f in (W, C):
        assert (tmp_path / "read" / f).read_bytes() == (tmp_path / "given" / f).read_bytes()
    wrong = {**given, "lin": {**given["lin"], "shape": [1, 2]}}
    with pytest.raises(ConfigError, match=r"base_fingerprints\['lin'\].*\[1, 2\]"):
        save_adapter(m, tmp_path / "wrong", base_fingerprints=wrong)
    with pytest.raises(ConfigError, match=r"base_fingerprints\['conv'\] is None"):
        save_adapter(m, tmp_path / "wrong", base_fingerprints={k: v for k, v in given.items() if k != "conv"})
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(lorakit.AdapterNotFoundError, match="'other'"):
        base_fingerprints(m, "other")


def test_a_nan_factor_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    m = adapted_net()
    with torch.no_grad():
        m.conv.lora["default"].B[0, 0] = float("inf")
    with pytest.raises(lorakit.NonFiniteError, match=r"^conv\.lora\.default\.B holds NaN/Inf"):
        save_adapter(m, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
