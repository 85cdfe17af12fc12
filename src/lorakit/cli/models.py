"""Building the model a command works on: ``model=``/``base=`` specs shared by every verb.

A spec is a factory ``package.module:factory`` (called with ``args=``), a local
transformers model folder (one with ``config.json``; needs the ``hf`` extra), or a
file whose suffix has a registered loader. Integrations register loaders for their
files; :data:`LAZY_BASE_LOADERS` names the module that registers one, so
``lorakit inspect model=yolo26n.yaml`` works without importing anything by hand::

    from lorakit.cli.models import register_base_loader
    register_base_loader(".pt", load_yolo)      # load_yolo(spec: str, args) -> nn.Module
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LoraError
from .args import ArgError


def load_model(spec: str, args: Any = None, key: str = "model") -> nn.Module:
    """Build a model from ``package.module:factory`` (called with ``args`` if given).

    ``key`` is the command-line key the spec came in (``model``, ``base``), named in errors.

    Raises ArgError naming the spec when it cannot be imported, the factory raises (a
    LoraError it raises passes through), or it does not give a module.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ArgError(
            f"{key}={spec!r}: expected 'package.module:factory' (e.g. torchvision.models:resnet18), "
            "a transformers model folder or a model file"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ArgError(f"{key}={spec!r}: cannot import: {exc}") from None
    except Exception as exc:  # the module's own code failed while it was imported
        raise ArgError(f"{key}={spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    with _reported(f"{key}={spec!r}: the factory"):
        if args is None:
            model = factory()
        elif isinstance(args, dict):
            model = factory(**args)
        else:
            model = factory(*(args if isinstance(args, (list, tuple)) else [args]))
    if not isinstance(model, nn.Module):
        raise ArgError(f"{key}={spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


@contextlib.contextmanager
def _reported(what: str) -> Iterator[None]:
    """User code (a factory, a loader) failing becomes an ArgError naming ``what``: one line, exit 2.

    lorakit's own typed errors pass through unchanged.
    """
    try:
        yield
    except LoraError:
        raise
    except Exception as exc:
        raise ArgError(f"{what} raised {type(exc).__name__}: {exc}") from exc


BaseLoader = Callable[[str, Any], nn.Module]
_LOADERS: dict[str, BaseLoader] = {}
# suffix -> module that calls register_base_loader for it when imported.
LAZY_BASE_LOADERS: dict[str, str] = {
    ".pt": "lorakit.yolo.cli_models",
    ".yaml": "lorakit.yolo.cli_models",
    ".yml": "lorakit.yolo.cli_models",
}


def register_base_loader(suffix: str, loader: BaseLoader) -> None:
    """Make ``base=<file><suffix>`` load with ``loader(spec, args)`` (suffix like ``".pt"``, any case)."""
    if not suffix.startswith(".") or len(suffix) < 2:
        raise ValueError(f"register_base_loader: suffix must look like '.pt', got {suffix!r}")
    _LOADERS[suffix.lower()] = loader


def load_base(spec: str, args: Any = None, key: str = "base") -> nn.Module:
    """The base model for ``spec``: a transformers model folder, a registered file loader by
    suffix, else a factory spec. ``key`` is the command-line key named in errors.

    Raises:
        ArgError: a file suffix without a loader, a loader or factory that raises, a
            factory spec that cannot be built, or ``args=`` given with a model folder.
        lorakit.hf.ModelPathError: a model folder transformers cannot load.
        MissingExtraError: a model folder without transformers installed.
    """
    if Path(spec).is_dir():
        return _transformers_folder(spec, args, key)
    suffix = Path(spec).suffix.lower()
    if suffix and ":" not in spec:
        if suffix not in _LOADERS and suffix in LAZY_BASE_LOADERS:
            importlib.import_module(LAZY_BASE_LOADERS[suffix])
        loader = _LOADERS.get(suffix)
        if loader is None:
            known = sorted(set(_LOADERS) | set(LAZY_BASE_LOADERS))
            raise ArgError(
                f"{key}={spec!r}: no loader for {suffix!r} files (known: {known or 'none'}); give a factory "
                "spec 'package.module:factory', or register one with lorakit.cli.models.register_base_loader"
            )
        with _reported(f"{key}={spec!r}: the {suffix} loader"):
            model = loader(spec, args)
        if not isinstance(model, nn.Module):
            raise ArgError(f"{key}={spec!r}: the {suffix} loader returned {type(model).__name__}, not an nn.Module")
        return model
    return load_model(spec, args, key)


def _transformers_folder(spec: str, args: Any, key: str) -> nn.Module:
    """A local transformers model folder, loaded as the class its ``config.json`` names
    (``architectures``; ``AutoModel`` when it names none), with local files only."""
    if not (Path(spec) / "config.json").is_file():
        raise ArgError(f"{key}={spec!r} is a folder without config.json: not a transformers model folder")
    if args is not None:
        raise ArgError(f"{key}={spec!r}: args= is for factory specs, not a model folder")
    from ..hf.train import load_folder  # needs the hf extra

    return load_folder(Path(spec))
