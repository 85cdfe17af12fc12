"""Low-level file handling for :mod:`lorakit.io`: strict safetensors and JSON
readers, a safetensors writer, atomic writes and tensor checksums (base-weight
fingerprints: :mod:`lorakit.io_fingerprint`).

A safetensors file is ``<u64 little-endian n><n bytes JSON header><data>``. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` of
str -> str. The safetensors library accepts duplicate header keys (the last
wins), so the header is parsed here first and every rule checked: no
duplicates, known dtypes, ``end - begin == numel * itemsize``, spans sorted,
contiguous, non-overlapping and covering the data section exactly (no trailing
bytes). Files are read fully into memory (never memory-mapped), so a later save
to the same path cannot change tensors already loaded; only regular files are
read, and never more than a size cap + 1 bytes (:func:`read_file`: a FIFO or a
link to ``/dev/zero`` is refused before any read). Tensor dtypes are checked in
the header, before any tensor is decoded (:func:`check_dtype`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .io_errors import AdapterFileError, DtypeMismatchError, NonFiniteTensorError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own cap
MAX_JSON = 16 * 1024 * 1024
# A sanity bound on weights files, far above any LoRA adapter: rank 256 on every linear layer
# of a 70B Llama is 3.3e9 parameters, 13 GB in float32.
MAX_WEIGHTS = 64 * 1024**3
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(path: Path, text: bytes) -> Any:
    """JSON with duplicate keys and NaN/Infinity constants rejected (raises AdapterFileError)."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as exc:
        raise AdapterFileError(path, f"invalid JSON: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterFileError(path, f"invalid JSON: {exc}") from None


FileId = tuple[int, int, int, int]
"""Which version of a file was read: ``(st_dev, st_ino, st_size, st_mtime_ns)``; a rename over it changes it."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """An open descriptor of the regular file ``path`` and its fstat.

    Opened non-blocking, so opening a FIFO returns at once instead of waiting for a writer;
    then the opened descriptor (not the path, which could be swapped in between) must be a
    regular file: a FIFO or a symlink to ``/dev/zero`` (``st_size`` 0, reads that never end)
    is refused before anything is read. Raises AdapterFileError naming ``path``.
    """
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise AdapterFileError(path, "file not found") from None
    except OSError as exc:
        raise AdapterFileError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFileError(path, f"is {_kind(st.st_mode)}; adapter files must be regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        yield fd, st
    except OSError as exc:
        raise AdapterFileError(path, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_file(path: Path, limit: int) -> tuple[bytes, FileId]:
    """The bytes of the regular file ``path`` and which version of it they are.

    Never reads more than ``limit`` + 1 bytes: the size is checked on the opened file
    (see :func:`_open_regular`), then at most one byte more than that size is read, to tell
    a file that grew while it was read.

    Raises:
        AdapterFileError: the file is missing, not a regular file, larger than ``limit``,
            grew while read, or unreadable.
    """
    with _open_regular(path) as (fd, st):
        if st.st_size > limit:
            raise AdapterFileError(path, f"file is larger than {limit} bytes ({st.st_size} bytes)")
        with open(fd, "rb", closefd=False) as f:  # buffered: read(n) reads until n bytes or the end
            data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise AdapterFileError(path, f"the file grew past its {st.st_size} bytes while it was read")
    return data, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_bytes(path: Path, limit: int) -> bytes:
    """The whole regular file, at most ``limit`` bytes (raises AdapterFileError as :func:`read_file`)."""
    return read_file(path, limit)[0]


def file_id(path: Path) -> FileId | None:
    """The :data:`FileId` ``path`` names now; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of safetensors file ``path``, reading its header only.

    Raises:
        AdapterFileError: unreadable, not a regular file, or a malformed header.
    """
    with _open_regular(path) as (fd, st), open(fd, "rb", closefd=False) as f:
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        if not 0 <= n <= min(MAX_HEADER, st.st_size - 8):
            raise AdapterFileError(path, "not a safetensors file (bad header length)")
        raw = f.read(n)
    header = parse_json(path, raw)
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(path, "safetensors __metadata__ must map strings to strings")
    return metadata


# -- dtypes --------------------------------------------------------------------------------
# Adapter tensors are floating point in a dtype torch trains parameters in. Float8 is refused
# everywhere: PEFT writes LoRA factors (and modules_to_save) in the dtype they were trained in,
# torch cannot even check float8 for NaN/Inf, and casting it up would hide a quantised export.
# Integer, bool and unsigned tensors are refused where the tensor must be floating (LoRA
# factors here; against a model, wherever the model's own tensor is floating); they stay
# allowed elsewhere because trained full modules carry integer buffers (BatchNorm's int64
# num_batches_tracked).

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
FLOATS = "a floating dtype (F16, BF16, F32 or F64)"
_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", **{v: k for k, v in FLOAT_DTYPES.items()},
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``torch.int64`` -> ``"I64"``); else torch's name."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_dtype(path: Path, key: str, dtype: str, floating: bool) -> None:
    """Refuse float8 (any floating dtype but F16/BF16/F32/F64) for every tensor, and a non-floating
    ``dtype`` where ``floating``. ``dtype``: a safetensors name, or torch's (:func:`dtype_name`).

    Raises:
        DtypeMismatchError: naming ``path``, ``key``, what was expected and ``dtype``.
    """
    if dtype not in FLOAT_DTYPES and dtype.startswith(("F8", "float")):  # torch's float8_*, float4_*, ...
        raise DtypeMismatchError(
            path, key, FLOATS, dtype, "float8 is not an adapter dtype: PEFT stores tensors in their training dtype"
        )
    if floating and dtype not in FLOAT_DTYPES:
        raise DtypeMismatchError(path, key, FLOATS, dtype, "LoRA factors are floating point; refused, not cast")


def parse_safetensors(
    path: Path, data: bytes, floating: Callable[[str], bool] = lambda key: False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (in memory, on CPU) and ``__metadata__`` of the safetensors file ``path`` holding ``data``, validated.

    ``floating(key)``: that tensor must have a floating dtype (checked in the header, before
    anything is decoded; float8 is refused for every tensor, see :func:`check_dtype`).

    Raises:
        AdapterFileError: the file breaks any rule in the module docstring; a
            ``lorakit_checksums`` entry in the metadata does not match the data.
        DtypeMismatchError: a tensor's dtype is refused.
        NonFiniteTensorError: a floating-point tensor holds NaN or Inf.
    """
    if len(data) < 8:
        raise AdapterFileError(path, f"truncated safetensors file ({len(data)} bytes, no header)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER:
        raise AdapterFileError(path, f"safetensors header length {n} exceeds the {MAX_HEADER}-byte cap")
    if 8 + n > len(data):
        raise AdapterFileError(path, f"safetensors header ({n} bytes) is larger than the file ({len(data)} bytes)")
    header = parse_json(path, data[8 : 8 + n])
    if not isinstance(header, dict):
        raise AdapterFileError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(path, "safetensors __metadata__ must map strings to strings")
    body = len(data) - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        spans.append((*_check_entry(path, key, info), key))
        check_dtype(path, key, info["dtype"], floating(key))
    spans.sort()
    end_prev, prev = 0, None
    for begin, end, key in spans:
        if begin < end_prev:
            raise AdapterFileError(path, f"tensor {key!r} overlaps tensor {prev!r} (offsets {begin} < {end_prev})")
        if begin > end_prev:
            raise AdapterFileError(path, f"gap of {begin - end_prev} bytes before tensor {key!r}")
        end_prev, prev = end, key
    if end_prev > body:
        raise AdapterFileError(path, f"truncated: tensors need {end_prev} data bytes, the file has {body}")
    if end_prev < body:
        raise AdapterFileError(path, f"{body - end_prev} trailing bytes after the last tensor")
    sums = _checksums_from(path, metadata)
    base = 8 + n
    for begin, end, key in spans:
        if key in sums and hashlib.sha256(data[base + begin : base + end]).hexdigest() != sums[key]:
            raise AdapterFileError(path, f"checksum mismatch for tensor {key!r}: the file is corrupted")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the format was checked above; anything left is still the file's fault
        raise AdapterFileError(path, f"safetensors could not decode the file: {exc}") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteTensorError(path, f"tensor {key!r} holds NaN or Inf values")
    return tensors, metadata


def _check_entry(path: Path, key: str, info: object) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(path, f"tensor {key!r}: header entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEMSIZE:
        raise AdapterFileError(path, f"tensor {key!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise AdapterFileError(path, f"tensor {key!r}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterFileError(path, f"tensor {key!r}: bad data_offsets {offsets!r}")
    need = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != need:
        raise AdapterFileError(
            path, f"tensor {key!r}: shape {shape} of {dtype} needs {need} bytes, offsets span {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1]


def _checksums_from(path: Path, metadata: Mapping[str, str]) -> dict[str, str]:
    raw = metadata.get("lorakit_checksums")
    if raw is None:
        return {}
    sums = parse_json(path, raw.encode())
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise AdapterFileError(path, "metadata lorakit_checksums is not a JSON object of strings")
    return sums


# safetensors' dtype names for the dtypes this writer covers, in the library's own dtype order (its writer sorts
# tensors by that order, last first, then by name; item sizes fall along it, so every tensor starts aligned)
_ST_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_ST_ORDER = {
    torch.bool: 0, torch.uint8: 1, torch.int8: 2, torch.float8_e5m2: 3, torch.float8_e4m3fn: 4, torch.int16: 5,
    torch.float16: 7, torch.bfloat16: 8, torch.int32: 9, torch.float32: 11, torch.float64: 12, torch.int64: 13,
}  # fmt: skip


@dataclass(frozen=True)
class Encoded:
    """Tensors laid out as a safetensors file's data section (:func:`encode_tensors`).

    Attributes:
        entries: each tensor's header entry, ``name -> {"dtype", "shape", "data_offsets"}``, in file order.
        data: the data section.
    """

    entries: dict[str, dict[str, Any]]
    data: bytes

    def checksums(self) -> dict[str, str]:
        """sha256 of each tensor's bytes (what :func:`checksum` gives), read from the data section."""
        view = memoryview(self.data)
        return {
            name: hashlib.sha256(view[e["data_offsets"][0] : e["data_offsets"][1]]).hexdigest()
            for name, e in self.entries.items()
        }


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> Encoded | None:
    """The data section and header entries safetensors writes for ``tensors``; None for what this
    writer does not cover (a dtype not in its table, tensors sharing memory, a big-endian machine),
    which :func:`safetensors_bytes` leaves to the library with its checks and errors.

    Tensors are ordered as the library orders them (by dtype, then name); item sizes fall along
    that order, so each tensor starts aligned to its item size. Each dtype's tensors are gathered
    in one ``torch.cat`` of their flattened values (a strided tensor is written as its values, in
    order), moved to the CPU once per dtype (each first, where they lie on several devices).
    """
    items = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER.get(kv[1].dtype, 0), kv[0]))
    filled = [t for _, t in items if t.numel()]
    if (
        sys.byteorder != "little"
        or any(t.dtype not in _ST_NAME for _, t in items)
        or len({t.untyped_storage().data_ptr() for t in filled}) < len(filled)
    ):
        return None
    entries: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for dtype, group in itertools.groupby(items, key=lambda kv: kv[1].dtype):
        run = list(group)
        size = torch.empty((), dtype=dtype).element_size()
        for name, t in run:
            end = offset + t.numel() * size
            entries[name] = {"dtype": _ST_NAME[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
            offset = end
        parts = [t.detach().reshape(-1) for _, t in run]
        if len({t.device for t in parts}) > 1:  # e.g. a model spread over devices: cat needs one
            parts = [t.to("cpu") for t in parts]
        flat = torch.cat(parts).to("cpu")
        chunks.append(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return Encoded(entries, b"".join(chunks))


def encode_owned(tensors: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], Encoded | None]:
    """What to write for ``tensors`` and its :func:`encode_tensors` encoding, for :func:`safetensors_bytes`:
    ``tensors`` as given when that covers them, else own contiguous CPU copies of them (encoded as
    well where they can be; otherwise None, for the library's writer, which refuses shared or
    strided storage that the copies no longer have)."""
    encoded = encode_tensors(tensors)
    if encoded is not None:
        return tensors, encoded
    owned = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return owned, encode_tensors(owned)


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, encoded: Encoded | None = None
) -> bytes:
    """The safetensors file of ``tensors`` and ``metadata``: what ``safetensors.torch.save`` writes, faster.

    ``safetensors.torch.save`` spends about 0.1 ms of Python per tensor; a YOLO adapter
    with its BatchNorm layers has ~800 tensors and its run writes ~1,800 every epoch.
    Here the data comes from :func:`encode_tensors` (``encoded``, when the caller made it
    already, e.g. to take :meth:`Encoded.checksums`). The layout is the library's, byte
    for byte up to the order of the metadata entries: header length (u64 little-endian),
    the JSON header (UTF-8) padded with spaces to a multiple of 8, then the data.
    Anything :func:`encode_tensors` does not cover goes to ``safetensors.torch.save``.
    """
    enc = encoded if encoded is not None else encode_tensors(tensors)
    if enc is None:
        return bytes(safetensors.torch.save(dict(tensors), metadata=None if metadata is None else dict(metadata)))
    # metadata keys sorted: the library writes them in hash-map order, which varies
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
    header.update(enc.entries)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + enc.data


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw little-endian bytes as a flat uint8 CPU tensor (no copy for a contiguous CPU tensor)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes safetensors writes for ``t``."""
    flat = byte_view(t)
    return bytes(flat.numpy().tobytes()) if flat.numel() else b""


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


# -- atomic writes -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``torch.save``,
    Ultralytics' ``Model.save``); when the block ends cleanly the file is fsynced and renamed
    over ``path``, so readers see the old file or the new one, never a mix.

    Then the folder is fsynced. On any failure the temp file is removed; an ``OSError`` is
    raised again naming ``path``.
    """
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", str(path)) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it; whatever was at ``path`` is removed
    first (a fixed temporary name: a killed writer's leftover is replaced, never followed if it
    is a symlink). Raises OSError.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
