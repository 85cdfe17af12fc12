"""Measurements every integration's comparison takes the same way: peak memory and bytes on disk."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: Any) -> tuple[float, str]:
    """``(MiB, what)``: CUDA's peak allocated memory on a CUDA ``device`` (what tensors held, not
    what the caching allocator reserved), else this process's peak RSS."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return peak_rss_mib(), "peak RSS"


def size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
