"""Malformed, hostile and pickle-based adapter files: typed errors naming the file, model untouched, no code run."""

from __future__ import annotations

import json
import pickle
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorakit
from lorakit.io import load_adapter, save_adapter
from lorakit.io_errors import AdapterConfigError, AdapterFileError, NonFiniteTensorError, UnsafeFormatError

from .io_models import adapted_net, make_net, state_hash
from .io_models import join_header as _join
from .io_models import split_header as _split

torch.set_num_threads(1)
W = "adapter_model.safetensors"
C = "adapter_config.json"


def _first_tensor(header: dict[str, object]) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def truncated(data: bytes) -> bytes:
    return data[: len(data) - 7]


def tiny(data: bytes) -> bytes:
    return data[:5]


def header_larger_than_file(data: bytes) -> bytes:
    return struct.pack("<Q", len(data) + 10) + data[8:]


def header_over_cap(data: bytes) -> bytes:
    return struct.pack("<Q", 2**62) + data[8:]


def not_json(data: bytes) -> bytes:
    h, body = _split(data)
    return _join(json.dumps(h)[:-3] + "xyz", body)


def duplicate_keys(data: bytes) -> bytes:
    h, body = _split(data)
    k = _first_tensor(h)
    text = json.dumps(h)
    # the same tensor name twice, pointing at the same bytes (safetensors itself would accept this)
    dup = text[:-1] + ", " + json.dumps(k) + ": " + json.dumps(h[k]) + "}"
    return _join(dup, body)


def overlapping(data: bytes) -> bytes:
    h, body = _split(data)
    names = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")  # type: ignore[index]
    second = names[1][1]
    off = h[second]["data_offsets"]  # type: ignore[index]
    h[second]["data_offsets"] = [off[0] - 4, off[1] - 4]  # type: ignore[index]
    return _join(h, body)


def trailing(data: bytes) -> bytes:
    return data + b"\0" * 16


def shape_bytes_mismatch(data: bytes) -> bytes:
    h, body = _split(data)
    k = _first_tensor(h)
    h[k]["shape"] = [1]  # type: ignore[index]
    return _join(h, body)


def unknown_dtype(data: bytes) -> bytes:
    h, body = _split(data)
    h[_first_tensor(h)]["dtype"] = "F12"  # type: ignore[index]
    return _join(h, body)


def header_is_list(data: bytes) -> bytes:
    return _join("[1, 2]", b"")


def metadata_not_strings(data: bytes) -> bytes:
    h, body = _split(data)
    h["__metadata__"] = {"format": 1}
    return _join(h, body)


def flipped_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[-3] ^= 0x40
    return bytes(b)


CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (truncated, "truncated"),
    "tiny": (tiny, "truncated"),
    "header_larger_than_file": (header_larger_than_file, "larger than the file"),
    "header_over_cap": (header_over_cap, "cap"),
    "not_json": (not_json, "invalid JSON"),
    "duplicate_keys": (duplicate_keys, "duplicate key"),
    "overlapping": (overlapping, "overlaps"),
    "trailing": (trailing, "trailing bytes"),
    "shape_bytes_mismatch": (shape_bytes_mismatch, "needs 4 bytes"),
    "unknown_dtype": (unknown_dtype, "unknown dtype"),
    "header_is_list": (header_is_list, "not a JSON object"),
    "metadata_not_strings": (metadata_not_strings, "__metadata__"),
    "flipped_byte": (flipped_byte, "checksum mismatch"),
}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_adapter(adapted_net(), tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_safetensors(saved: Path, case: str) -> None:
    corrupt, message = CORRUPTIONS[case]
    (saved / W).write_bytes(corrupt((saved / W).read_bytes()))
    m = make_net()
    before = state_hash(m)
    with pytest.raises(AdapterFileError, match=message) as err:
        load_adapter(m, saved)
    assert str(saved / W) in str(err.value)
    assert state_hash(m) == before and lorakit.list_adapters(m) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor(saved: Path, value: float) -> None:
    tensors = safetensors.torch.load((saved / W).read_bytes())
    tensors["base_model.model.lin.lora_B.weight"][0, 0] = value
    safetensors.torch.save_file(tensors, str(saved / W), metadata={"format": "pt"})
    m = make_net()
    with pytest.raises(NonFiniteTensorError, match="lin.lora_B") as err:
        load_adapter(m, saved)
    assert isinstance(err.value, lorakit.NonFiniteError) and str(saved / W) in str(err.value)
    assert lorakit.list_adapters(m) == []


class Canary:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_canary_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow_pickle: bool) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    folder = tmp_path / "adapter"
    save_adapter(adapted_net(), folder)
    (folder / W).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Canary(marker)}))
    m = make_net()
    expected = AdapterFileError if allow_pickle else UnsafeFormatError
    with pytest.raises(expected) as err:
        load_adapter(m, folder, allow_pickle=allow_pickle)
    assert str(folder / "adapter_model.bin") in str(err.value)
    if not allow_pickle:
        assert "safetensors" in str(err.value)
    assert not marker.exists() and lorakit.list_adapters(m) == []


def test_pickle_file_path_refused_and_opt_in_reads_plain_tensors(tmp_path: Path) -> None:
    save_adapter(adapted_net(), tmp_path)
    tensors = safetensors.torch.load((tmp_path / W).read_bytes())
    (tmp_path / W).unlink()
    torch.save(tensors, tmp_path / "adapter_model.pt")
    with pytest.raises(UnsafeFormatError, match="safetensors"):
        load_adapter(make_net(), tmp_path / "adapter_model.pt")
    m = make_net()
    load_adapter(m, tmp_path, allow_pickle=True)
    ref = adapted_net()
    assert torch.equal(m(torch.arange(5)[None]), ref(torch.arange(5)[None]))


def test_no_fallback_from_broken_safetensors_to_pickle(saved: Path) -> None:
    good = safetensors.torch.load((saved / W).read_bytes())
    torch.save(good, saved / "adapter_model.bin")
    (saved / W).write_bytes(b"garbage!garbage!")
    with pytest.raises(AdapterFileError) as err:
        load_adapter(make_net(), saved, allow_pickle=True)
    assert str(saved / W) in str(err.value)


def _edit_config(folder: Path, **changes: object) -> None:
    """Change adapter_config.json and drop lorakit's config hash (as a hand-made PEFT file would have)."""
    tensors = safetensors.torch.load((folder / W).read_bytes())
    safetensors.torch.save_file(tensors, str(folder / W), metadata={"format": "pt"})
    cfg = json.loads((folder / C).read_text())
    cfg.update(changes)
    (folder / C).write_text(json.dumps(cfg))


def test_config_cannot_import_anything(saved: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "evil_lorakit_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(lib))
    # megatron_core is a module name PEFT once imported; custom_module is simply unknown.
    _edit_config(saved, megatron_core="evil_lorakit_mod", custom_module="evil_lorakit_mod")
    m = make_net()
    with pytest.raises(AdapterConfigError, match="custom_module") as err:
        load_adapter(m, saved)
    assert str(saved / C) in str(err.value) and lorakit.list_adapters(m) == []
    report = load_adapter(m, saved, strict=False)
    assert report.unknown_config_keys == ("custom_module",) and not report.complete
    assert not marker.exists() and "evil_lorakit_mod" not in sys.modules


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": True}, "gconv: DoRA on a grouped Conv2d"),  # DoRA reads, but refuses grouped convs
        ({"lora_bias": True}, "lora_B.bias"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"target_modules": None}, "target_modules"),
        ({"r": 0}, "LoraConfig.r"),
        ({"lora_alpha": "big"}, "alpha"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_bad_config_values(saved: Path, changes: dict[str, object], message: str) -> None:
    _edit_config(saved, **changes)
    m = make_net()
    with pytest.raises(AdapterConfigError, match=message) as err:
        load_adapter(m, saved)
    assert str(saved / C) in str(err.value) and lorakit.list_adapters(m) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"peft_type": "LORA", "r": 4, "r": 8}', "duplicate key 'r'"),
        ('{"peft_type": "LORA", "lora_alpha": NaN}', "NaN"),
        ("[1, 2]", "JSON object"),
        ("\xff\xfe", "invalid JSON"),
    ],
)
def test_malformed_config_json(saved: Path, text: str, message: str) -> None:
    _edit_config(saved)
    (saved / C).write_bytes(text.encode("latin-1"))
    with pytest.raises(AdapterFileError, match=message) as err:
        load_adapter(make_net(), saved)
    assert str(saved / C) in str(err.value)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="no such adapter folder") as err:
        load_adapter(make_net(), tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(AdapterFileError, match=f"no {W}"):
        load_adapter(make_net(), tmp_path)
    save_adapter(adapted_net(), tmp_path)
    (tmp_path / C).unlink()
    with pytest.raises(AdapterFileError, match="file not found") as err:
        load_adapter(make_net(), tmp_path)
    assert str(tmp_path / C) in str(err.value)
