"""Reading an adapter folder from disk, before any model is involved.

:func:`read_adapter_files` finds the pair of files (:func:`locate`: never falls back from
a present safetensors file, refuses pickle files unless asked), reads them as one pair
(:mod:`lorakit.io_folder`) and checks everything a file alone can show: format rules,
checksums, dtypes, finite values, and that the config belongs to the weights.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .io_errors import AdapterFileError, NonFiniteTensorError, UnsafeFormatError
from .io_folder import CONFIG_FILE, WEIGHTS_FILE, read_pair
from .io_format import check_dtype, dtype_name, parse_json, parse_safetensors
from .io_peft import factor_key_test

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def locate(path: Path, allow_pickle: bool) -> tuple[Path, Path]:
    """(config file, weights file). Never falls back from a present .safetensors to anything else.

    Anything at ``path`` that is not a folder is taken as the weights file (reading it
    refuses what is not a regular file, e.g. a FIFO).
    """
    if path.is_dir():
        folder = path
        candidates = [folder / WEIGHTS_FILE] + [folder / f"adapter_model{s}" for s in PICKLE_SUFFIXES]
        found = [c for c in candidates if os.path.lexists(c)]
        if not found:
            raise AdapterFileError(folder, f"no {WEIGHTS_FILE} in the folder")
        weights = found[0]
    elif os.path.lexists(path):
        folder, weights = path.parent, path
    else:
        raise AdapterFileError(path, "no such adapter folder")
    if weights.suffix in PICKLE_SUFFIXES and not allow_pickle:
        # No CLI verb reads pickle files, so the way to opt in is named for Python callers only.
        raise UnsafeFormatError(
            weights,
            "refusing a pickle-based weights file (unpickling can run code); save the adapter as "
            f"{WEIGHTS_FILE} (safetensors), or read it from Python with lorakit.load_adapter(..., "
            "allow_pickle=True), which uses torch.load(weights_only=True)",
        )
    if weights.suffix not in PICKLE_SUFFIXES and weights.suffix != ".safetensors":
        raise AdapterFileError(weights, "adapter weights must be a .safetensors file")
    return folder / CONFIG_FILE, weights


def _read_pickle(weights: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(weights, f"torch.load(weights_only=True) refused or failed: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFileError(weights, "expected a dict of tensor name -> tensor")
    is_factor_key = factor_key_test()
    for k, t in obj.items():
        check_dtype(weights, k, dtype_name(t.dtype), is_factor_key(k))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteTensorError(weights, f"tensor {k!r} holds NaN or Inf values")
    return obj


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder read from disk and checked, before anything touches a model.

    ``raw_config`` is the parsed ``adapter_config.json`` (not yet validated as a PEFT
    config); ``tensors`` and ``metadata`` come from the weights file.
    """

    config_file: Path
    weights_file: Path
    raw_config: Any
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_adapter_files(path: str | Path, *, allow_pickle: bool = False) -> AdapterFiles:
    """Read an adapter folder (or its weights file) with every file-level check of
    :func:`load_adapter`: format rules, checksums, finite values, and that the config
    belongs to the weights (``lorakit_config_sha256``).

    A folder that a save is replacing, or that a killed save left after its commit
    point, reads as the old adapter or the new one (:mod:`lorakit.io_folder`).

    Raises:
        UnsafeFormatError, AdapterFileError, DtypeMismatchError, NonFiniteTensorError: as
            :func:`load_adapter`.
    """
    cfg_file, weights = locate(Path(path), allow_pickle)

    def parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if weights.suffix == ".safetensors":
            return parse_safetensors(weights, data, floating=factor_key_test())
        return _read_pickle(weights, data), {}

    cfg_bytes, (tensors, metadata) = read_pair(cfg_file, weights, parse)
    return AdapterFiles(cfg_file, weights, parse_json(cfg_file, cfg_bytes), tensors, metadata)
