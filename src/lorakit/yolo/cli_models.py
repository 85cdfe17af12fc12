"""Loaders for YOLO files on the command line: ``model=yolo26n.yaml`` / ``base=best.pt``.

Registered with :func:`lorakit.cli.models.register_base_loader` when imported (the
CLI imports this module itself when it meets a ``.pt``/``.yaml``/``.yml`` spec).
Ultralytics is switched to offline mode first. A ``.pt`` checkpoint is a pickle:
Ultralytics unpickles it, so only load checkpoints you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..cli.args import ArgError
from ..cli.models import register_base_loader
from . import offline


def require_local(spec: str, key: str = "model") -> None:
    """Refuse a ``.pt`` spec that is not a local file, before Ultralytics sees it.

    Ultralytics would otherwise try to download a name it knows (``yolo26n.pt``)
    from GitHub, even in offline mode. ``.yaml`` names such as ``yolo26n.yaml``
    pass: they resolve to the configs Ultralytics ships.

    Raises:
        ArgError: naming ``key=spec``.
    """
    if Path(spec).suffix.lower() == ".pt" and not Path(spec).is_file():
        raise ArgError(f"{key}={spec!r}: no such file (lorakit never downloads weights; give a local .pt)")


def local_data(value: Any, key: str = "data") -> str:
    """``data=``: a local path; a detection YAML's images must exist, so Ultralytics never
    falls back to the YAML's ``download:`` (a URL or a script it would run).

    Raises:
        ArgError: naming ``key=value``: not a path, no such file, or a dataset whose images are missing.
    """
    if not isinstance(value, str):
        raise ArgError(f"{key}= must be a path to a data YAML, got {value!r}")
    if not Path(value).exists():
        raise ArgError(f"{key}={value!r}: no such file (lorakit never downloads datasets; give a local data YAML)")
    if Path(value).suffix.lower() in (".yaml", ".yml"):
        from ultralytics.data.utils import check_det_dataset

        try:
            check_det_dataset(value, autodownload=False)
        except (FileNotFoundError, SyntaxError, TypeError, ValueError, KeyError) as exc:
            raise ArgError(f"{key}={value!r}: {first_line(exc)}") from None
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Ultralytics' run over several)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_yolo(spec: str, args: Any = None) -> nn.Module:
    """The ``nn.Module`` (e.g. ``DetectionModel``) of a YOLO ``.yaml`` or a local ``.pt``
    (see :func:`require_local`)."""
    require_local(spec)
    offline.enable()
    from ultralytics import YOLO  # type: ignore[attr-defined]

    try:
        model = YOLO(spec).model
    except (FileNotFoundError, ConnectionError, RuntimeError) as exc:
        raise ArgError(f"model={spec!r}: Ultralytics cannot load it ({exc}); give a local .pt or a .yaml") from None
    if not isinstance(model, nn.Module):
        raise ArgError(f"model={spec!r}: Ultralytics gave {type(model).__name__}, not an nn.Module")
    return model


for _suffix in (".pt", ".yaml", ".yml"):
    register_base_loader(_suffix, load_yolo)
