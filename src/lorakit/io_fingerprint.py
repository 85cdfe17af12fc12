"""Base-weight fingerprints: what an adapter file records of each adapted layer's base weight,
so loading onto another model's weights (same shapes) is caught.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .io_errors import AdapterFileError
from .io_format import byte_view, checksum

# -- base-weight fingerprints --------------------------------------------------------------
# Per adapted layer: dtype, shape, a CRC-32 of the bytes, and 16 evenly spaced sample values
# plus the norm in float64. Same dtype: the CRC must match (files from before 0.1.0's
# release carry a sha256 instead, checked as such). Other dtype (e.g. an fp32-trained
# adapter on a bf16 copy of the same model): the samples and norm must agree to 1% of the
# layer's RMS, which tells a cast copy from other weights.
#
# The fingerprint guards against loading onto the wrong model by accident, not against an
# adversary (anyone who can edit the file can edit the fingerprint), so a 32-bit CRC
# together with the samples and the norm is enough. Every adapted weight is fingerprinted
# on each load: sha256 read 257 MB/s on this repository's CPU, zlib's CRC-32 1.3 GB/s.

_SAMPLES = 16


def _crc32(t: torch.Tensor) -> str:
    flat = byte_view(t)
    # zero-copy: zlib reads the tensor's own memory through numpy's buffer
    return f"{zlib.crc32(flat.numpy().data) if flat.numel() else 0:08x}"


def _samples(flat: torch.Tensor) -> list[float]:
    idx = torch.linspace(0, max(flat.numel() - 1, 0), _SAMPLES).round().long().to(flat.device)
    return flat[idx].double().cpu().tolist() if flat.numel() else []


def _norm(w: torch.Tensor) -> float:
    if not (w.is_floating_point() or w.is_complex()):  # a quantised base's packed integers (lorakit.quant)
        w = w.to(torch.float32)  # exact for 8- and 16-bit integers; one layer at a time
    # accumulated in float64 without a float64 copy of the weight
    return float(torch.linalg.vector_norm(w, dtype=torch.float64))


def fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """dtype, shape, CRC-32 of the bytes, 16 evenly spaced samples and the float64 norm."""
    w = weight.detach()
    return {
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
        "crc32": _crc32(w),
        "samples": _samples(w.reshape(-1)),
        "norm": _norm(w),
    }


def check_fingerprint(path: Path, layer: str, saved: object) -> Mapping[str, Any]:
    """``saved`` (``layer``'s entry in the ``lorakit_base`` metadata of ``path``) when every field has
    the type :func:`fingerprint` writes (files from before 0.1.0: ``sha256`` instead of ``crc32``).

    Raises:
        AdapterFileError: naming the layer and the malformed field.
    """
    where = f"metadata lorakit_base[{layer!r}]"
    if not isinstance(saved, dict):
        raise AdapterFileError(path, f"{where} must be a JSON object, got {type(saved).__name__}")

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    rules: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "dtype": ("a string", lambda v: isinstance(v, str)),
        "shape": ("a list of ints >= 0", lambda v: isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)),
        "crc32": ("a string", lambda v: isinstance(v, str)),
        "sha256": ("a string", lambda v: isinstance(v, str)),
        "samples": ("a list of numbers", lambda v: isinstance(v, list) and all(number(x) for x in v)),
        "norm": ("a number", number),
    }
    for field, (want, ok) in rules.items():
        if field in saved and not ok(saved[field]):
            raise AdapterFileError(path, f"{where}.{field} must be {want}, got {saved[field]!r:.80}")
    return saved


def same_base(saved: Mapping[str, Any], weight: torch.Tensor) -> bool:
    """True when ``weight`` is the weight the fingerprint ``saved`` (checked by
    :func:`check_fingerprint`) was taken of.

    Computes only what the comparison needs: the digest when the dtype is the same
    ("crc32", or "sha256" in files from before the switch), else samples and norm.
    """
    w = weight.detach()
    if list(saved.get("shape", [])) != list(w.shape):
        return False
    if saved.get("dtype") == str(w.dtype).removeprefix("torch."):
        if "crc32" in saved:
            return bool(saved["crc32"] == _crc32(w))
        return "sha256" in saved and bool(saved["sha256"] == checksum(w))
    norm = _norm(w)
    rms = norm / math.sqrt(w.numel() or 1)
    tol = 0.01 * rms + 1e-12
    a, b = saved.get("samples", []), _samples(w.reshape(-1))
    if not isinstance(a, list) or len(a) != len(b):
        return False
    norm_ok = abs(float(saved.get("norm", -1.0)) - norm) <= 0.01 * norm + 1e-12
    return norm_ok and all(isinstance(x, (int, float)) and abs(x - y) <= tol for x, y in zip(a, b, strict=True))
