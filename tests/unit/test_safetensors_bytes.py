"""lorakit's safetensors writer (io_format.safetensors_bytes) writes exactly the library's bytes, faster."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lorakit.io_format import checksum, encode_owned, encode_tensors, safetensors_bytes


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f64": torch.randn(7, generator=gen, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=gen).half(),
        "bf16": torch.randn(5, generator=gen).bfloat16(),
        "i64": torch.arange(9),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "strided": base.t(),  # not contiguous: written as its values
        "z.conv.lora_A.weight": torch.randn(8, 3, 3, 3, generator=gen),
        "z.channels_last": torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last),
    }


def _split(data: bytes) -> tuple[dict[str, object], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@pytest.mark.parametrize(
    "metadata", [None, {}, {"z": "ü"}, {"format": "pt", "lorakit_checksums": '{"a": "b"}', "z": "ü"}]
)
def test_bytes_equal_the_librarys(metadata: dict[str, str] | None) -> None:
    tensors = _tensors()
    ref = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    ours = safetensors_bytes(tensors, metadata)
    if metadata is None or len(metadata) < 2:
        assert ours == ref
    else:  # the library writes metadata entries in hash-map order; everything else is the same
        assert _split(ours) == _split(ref) and len(ours) == len(ref)
    back = safetensors.torch.load(ours)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_shared_memory_gets_the_librarys_refusal() -> None:
    t = torch.randn(4)
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors_bytes({"a": t, "b": t})
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors.torch.save({"a": t, "b": t})


def test_checksums_from_the_data_section_equal_each_tensors() -> None:
    tensors = _tensors()
    encoded = encode_tensors(tensors)
    assert encoded is not None
    assert encoded.checksums() == {k: checksum(v) for k, v in tensors.items()}
    assert safetensors_bytes(tensors, {"a": "b"}, encoded) == safetensors_bytes(tensors, {"a": "b"})


def test_what_it_does_not_cover_is_left_to_the_library() -> None:
    t = torch.randn(4)
    assert encode_tensors({"a": t, "b": t}) is None  # shared memory: the library refuses it (above)
    assert encode_tensors({"c": torch.zeros(2, dtype=torch.complex64)}) is None


def test_encode_owned_writes_shared_storage_as_separate_copies() -> None:
    """What lorakit's own files need (tied weights in a trained module): each entry written as its values."""
    t = torch.randn(4)
    tensors = {"a": t, "b": t, "c": torch.randn(2, 3).t()}
    written, encoded = encode_owned(tensors)
    assert encoded is not None and written["a"].data_ptr() != written["b"].data_ptr()
    back = safetensors.torch.load(safetensors_bytes(written, encoded=encoded))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    plain = {"x": torch.randn(3)}
    assert encode_owned(plain)[0] is plain  # covered as given: no copies
