"""``lorakit merge``: fold an adapter into its base model and write the merged weights.

    lorakit merge base=torchvision.models:resnet18 adapter=runs/a out=merged.safetensors

Builds the base model, loads the adapter strictly (:func:`lorakit.load_adapter`:
every key, shape, checksum and the base-model fingerprint checked), merges it
and writes the plain model's ``state_dict`` (the base's own keys, no LoRA key)
as one ``.safetensors`` file, atomically. Load it into a fresh base with
``model.load_state_dict(safetensors.torch.load_file(out))``.

Base loaders (the hook for integrations). ``base=`` is a factory spec
``package.module:factory`` (built by :func:`lorakit.cli.models.load_model`, with
``args=``), a local transformers model folder (``config.json``; the ``hf`` extra),
or a file whose suffix has a registered loader::

    from lorakit.cli.models import register_base_loader
    register_base_loader(".pt", load_yolo)      # load_yolo(spec: str, args) -> nn.Module

:data:`LAZY_BASE_LOADERS` maps a suffix to the module that registers its loader
when imported, so ``lorakit merge base=yolov8n.pt ...`` works without importing
anything by hand (the YOLO integration adds ``".pt"``, ``".yaml"`` and ``".yml"`` there).

``root=DIR`` (for scripts and servers passing names they received): ``adapter``
and ``out`` are then names inside ``DIR`` and are refused if they would leave it
(``..``, absolute paths, symlinks pointing out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .._version import __version__
from ..adapters import merge_and_unload
from ..io import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from ..io_format import atomic_write
from .args import ArgError, parse_args, wants_help
from .models import load_base
from .paths import inside

KEYS = {"base", "args", "adapter", "out", "root", "allow_other_base", "overwrite"}


def _flag(opts: dict[str, Any], key: str) -> bool:
    value = opts.get(key, False)
    if not isinstance(value, bool):
        raise ArgError(f"{key}= must be True or False, got {value!r}")
    return value


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as own contiguous CPU tensors (tied weights are written once per key)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ArgError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; cannot write it")
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def run(argv: list[str]) -> int:
    if wants_help(argv):
        print(__doc__)
        return 0
    opts = parse_args(argv, KEYS, "merge")
    for key in ("base", "adapter", "out"):
        if not isinstance(opts.get(key), str):
            raise ArgError(f"{key}=... is required, e.g. base=pkg.models:make adapter=runs/a out=m.safetensors")
    adapter, out = Path(opts["adapter"]), Path(opts["out"])
    if "root" in opts:
        root = Path(str(opts["root"]))
        if not root.is_dir():
            raise ArgError(f"root={str(root)!r} is not a folder")
        adapter, out = inside(root, opts["adapter"], "adapter"), inside(root, opts["out"], "out")
    if out.suffix != ".safetensors":
        raise ArgError(f"out={str(out)!r} must end with .safetensors")
    if out.is_dir():
        raise ArgError(f"out={str(out)!r} is a folder")
    if not out.parent.is_dir():
        raise ArgError(f"out={str(out)!r}: folder {str(out.parent)!r} does not exist")
    if out.exists() and not _flag(opts, "overwrite"):
        raise ArgError(f"out={str(out)!r} exists; pass overwrite=True to replace it")
    own = {(adapter / f).resolve() for f in (WEIGHTS_FILE, CONFIG_FILE)} | {adapter.resolve()}
    if out.resolve() in own:
        raise ArgError(f"out={str(out)!r} would overwrite the adapter itself")

    model = load_base(opts["base"], opts.get("args"), "base")
    report = load_adapter(model, adapter, "merge", strict=True, allow_other_base=_flag(opts, "allow_other_base"))
    merge_and_unload(model, "merge")
    tensors = merged_state(model)
    meta = {
        "format": "pt",
        "lorakit_version": __version__,
        "lorakit_merged": json.dumps({"base": opts["base"], "adapter": adapter.name, "layers": len(report.layers)}),
    }
    data = safetensors.torch.save(tensors, metadata=meta)
    try:
        atomic_write(out, data)
    except OSError as exc:
        raise ArgError(str(exc)) from None
    print(
        f"merged {adapter} ({len(report.layers)} layers, {report.writer}) into {opts['base']}; "
        f"wrote {len(tensors)} tensors, {len(data):,} bytes, to {out}"
    )
    return 0
