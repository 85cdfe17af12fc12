"""Output comparisons shared by the YOLO tests (imported as ``yolo_helpers``: tests/yolo is on sys.path)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn


def tensors(y: Any) -> list[torch.Tensor]:
    """Every tensor in a model's (nested list/tuple/dict) output, in a fixed order."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = [y[k] for k in sorted(y)]
    return [t for v in y for t in tensors(v)] if isinstance(y, (list, tuple)) else []


def final_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs (both heads in eval mode), flattened into one vector, without autograd."""
    with torch.no_grad():
        return torch.cat([t.flatten() for t in tensors(model(x))])


def layer_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every conv's and linear's output and every tensor of the output, flattened into one vector.

    Random-weight final predictions barely depend on the weights (activations shrink with
    depth and the scores saturate), so comparing them alone could hide a wrong merge; the
    per-layer activations do not.
    """
    acts: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: acts.append(o.flatten()))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        final = tensors(model(x))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(acts + [t.flatten() for t in final])


# Prepended to the code a test runs in a subprocess (which the conftest guard does not reach): any
# network access exits the process with this message. Exiting, not raising OSError, because
# Ultralytics' check_font swallows errors; SystemExit is not an Exception, so it gets through.
NETWORK_REFUSED = """
import socket, sys
def refuse(*a, **k):
    raise SystemExit(f"network access attempted: {a}")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
"""


# Tiny CPU training: nbs=batch and no warmup, so every batch is an optimizer step at full lr
# (else a few batches make ~0 steps).
TINY_TRAIN = {
    "batch": 8,
    "nbs": 8,
    "warmup_epochs": 0,
    "workers": 0,
    "plots": False,
    "device": "cpu",
    "verbose": False,
    "seed": 0,
}


def save_random_detector(path: Path, seed: int, nc: int = 2) -> Path:
    """A random-weight yolo26n with ``nc`` classes saved as a ``.pt`` (stands in for pretrained weights)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    y = YOLO("yolo26n.yaml")
    y.model = DetectionModel("yolo26n.yaml", nc=nc, verbose=False)
    y.save(path)
    return path


def start_snapshot(start: dict[str, Any]) -> Any:
    """An ``on_pretrain_routine_end`` callback (after the optimizer, EMA and freezing are set up)
    that records into ``start`` the model's state, its trainable names, the optimized tensors' ids
    and an id -> name map."""

    def snapshot(trainer: Any) -> None:
        m = trainer.model
        start["state"] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        start["requires_grad"] = {n for n, p in m.named_parameters() if p.requires_grad}
        start["optimized"] = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        start["names"] = {id(p): n for n, p in m.named_parameters()}

    return snapshot


def with_run_args(src: Path, dst: Path, **train_args: Any) -> Path:
    """A copy of checkpoint ``src`` whose ``train_args`` say its run used ``train_args`` (as a base
    pre-trained on another data set says); the weights are untouched, so adapters still fit it."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["train_args"] = {**(ckpt.get("train_args") or {}), **train_args}
    torch.save(ckpt, dst)
    return dst


def checkpoint(path: Path) -> dict[str, Any]:
    """An Ultralytics checkpoint's dict (it pickles modules, so not ``weights_only``)."""
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt


# A sitecustomize.py for child interpreters a test does not start itself (the demo's stages, compare's
# strategies), which neither the conftest guard nor NETWORK_REFUSED reaches: every DNS lookup and
# connection is recorded in $LORAKIT_NETWORK_LOG and refused.
_CHILD_GUARD = textwrap.dedent(
    """
    import os, socket

    def _refuse(*args, **kwargs):
        with open(os.environ["LORAKIT_NETWORK_LOG"], "a") as f:
            f.write(f"{args[:2]}\\n")
        raise OSError("network access blocked by tests/yolo/yolo_helpers.py")

    socket.getaddrinfo = _refuse
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    """
)


def child_network_guard(root: Path) -> tuple[dict[str, str], Path]:
    """``(env, log)``: environment entries that make every child Python interpreter refuse the
    network and record each attempt in ``log`` (empty or absent: none was made)."""
    guard = root / "network_guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(_CHILD_GUARD)
    log = root / "network.log"
    path = os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "LORAKIT_NETWORK_LOG": str(log)}, log


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickled_modules(path: Path) -> set[str]:
    """The modules a ``torch.save`` file's pickle imports classes or functions from, read without unpickling.

    A plain Ultralytics checkpoint must name no ``lorakit`` module. Searching the raw bytes for
    "lorakit" is not the same check: Ultralytics stores the git commit message of the current
    checkout in every checkpoint's ``train_args``, so any commit subject naming the project failed it.
    """
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    modules: set[str] = set()
    pushed: list[Any] = []  # what each opcode pushed (None for non-strings): STACK_GLOBAL reads the last two
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(data):
        if op.name in _STRING_OPS:
            pushed.append(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif op.name in ("GLOBAL", "INST"):
            modules.add(str(arg).split(" ")[0])
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            modules.add(str(pushed[-2]))
            pushed.append(None)
        else:
            pushed.append(None)
    return modules


def assert_no_lorakit_class(path: Path) -> None:
    """The checkpoint's pickle references no lorakit module (so plain Ultralytics can load it)."""
    named = sorted(m for m in pickled_modules(Path(path)) if m == "lorakit" or m.startswith("lorakit."))
    assert not named, f"{path} pickles lorakit classes from {named}"
