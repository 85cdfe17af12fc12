"""``lorakit diff``: what two adapter files differ in.

    lorakit diff a=runs/a b=runs/b [atol=0]

Both folders are read with every check :func:`lorakit.load_adapter` makes on a
file (format, checksums, finite values, config belonging to the weights); no
model is needed. Printed: the ``adapter_config.json`` keys whose values differ,
tensors found in only one file, tensors whose shape or dtype differ, and for
every other common tensor that differs by more than ``atol`` its largest
absolute difference ``max|a-b|`` and relative norm ``||a-b|| / ||a||``.

Exit code: 0 identical (every common tensor within ``atol``, default 0: bitwise),
1 different, 2 error (unreadable or invalid file, bad arguments).
"""

from __future__ import annotations

import math
import sys
import traceback
from typing import Any

import torch

from ..errors import LoraError
from ..io import read_adapter_files
from ..io_errors import AdapterFileError
from .args import ArgError, parse_args, wants_help

KEYS = {"a", "b", "atol"}


def _show(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max|a-b|, ||a-b|| / ||a||)`` in float64; the relative norm is inf when ``a`` is 0 and ``b`` is not."""
    x, y = a.double(), b.double()
    d = x - y
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    num, den = float(d.norm()), float(x.norm())
    rel = num / den if den else (0.0 if num == 0 else math.inf)
    return max_abs, rel


def diff_lines(a: str, b: str, atol: float = 0.0) -> list[str]:
    """One line per difference between the adapter folders ``a`` and ``b`` (empty: identical)."""
    fa, fb = read_adapter_files(a), read_adapter_files(b)
    for f in (fa, fb):
        if not isinstance(f.raw_config, dict):
            raise AdapterFileError(f.config_file, "adapter_config.json must hold a JSON object")
    lines: list[str] = []
    ca, cb = fa.raw_config, fb.raw_config
    missing = object()
    for key in sorted(set(ca) | set(cb)):
        va, vb = ca.get(key, missing), cb.get(key, missing)
        if va != vb:
            left = "(absent)" if va is missing else _show(va)
            right = "(absent)" if vb is missing else _show(vb)
            lines.append(f"config   {key}: {left} -> {right}")
    ta, tb = fa.tensors, fb.tensors
    lines += [f"only a   {k} {list(ta[k].shape)}" for k in sorted(set(ta) - set(tb))]
    lines += [f"only b   {k} {list(tb[k].shape)}" for k in sorted(set(tb) - set(ta))]
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            lines.append(f"shape    {key}: {list(x.shape)} -> {list(y.shape)}")
            continue
        dtype = "" if x.dtype == y.dtype else f" (dtype {x.dtype} -> {y.dtype})"
        if not dtype and torch.equal(x, y):
            continue
        max_abs, rel = compare_tensors(x, y)
        if dtype or max_abs > atol:
            lines.append(f"values   {key}: max|a-b| {max_abs:.3e}  ||a-b||/||a|| {rel:.3e}{dtype}")
    return lines


def run(argv: list[str]) -> int:
    if wants_help(argv):
        print(__doc__)
        return 0
    opts = parse_args(argv, KEYS, "diff")
    for key in ("a", "b"):
        if not isinstance(opts.get(key), str):
            raise ArgError(f"{key}=... is required: an adapter folder, e.g. lorakit diff a=runs/a b=runs/b")
    atol = opts.get("atol", 0.0)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (atol >= 0) or math.isinf(atol):
        raise ArgError(f"atol= must be a finite number >= 0, got {atol!r}")
    try:
        lines = diff_lines(opts["a"], opts["b"], float(atol))
    except LoraError:
        raise
    except Exception as exc:  # a failure here must not exit 1, which means "different"
        traceback.print_exc()
        print(f"lorakit diff: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    if lines:
        print(f"{len(lines)} difference(s) between {opts['a']} and {opts['b']}")
        return 1
    print(f"identical: {opts['a']} and {opts['b']}" + (f" (atol={atol:g})" if atol else ""))
    return 0
