"""Typed errors. Every lorakit error derives from :class:`LoraError`.

Each subclass also derives from the builtin a caller would naturally catch
(``ValueError`` for bad values), so ``except ValueError`` keeps working.

This is the home of the core's errors, the command line's included. The errors about
adapter files, which all carry the file's ``path``, have theirs in :mod:`lorakit.io_errors`;
the integrations' own (``lorakit.hf``: training data, model folders, resume) sit beside
the code that raises them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoraError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LoraError, ValueError):
    """A configuration value is invalid. The message names the field and the value."""


class TargetError(LoraError, ValueError):
    """Target selection failed: nothing matched, or a matched layer cannot take LoRA."""


class AdapterNotFoundError(LoraError, ValueError):
    """An adapter name was used that the model does not have."""


class NonFiniteError(LoraError, ValueError):
    """An adapter holds NaN or Inf values; refused before anything was changed."""


class MixedBatchError(LoraError, ValueError):
    """A mixed batch cannot run (training mode, merged adapters, a batch of another size,
    adapters with fully trained modules), or a state change was asked for inside one."""


class ArgError(LoraError, ValueError):
    """A command-line argument is malformed or unknown (the CLI prints it on one line and exits 2)."""


class StrategyFailedError(LoraError, RuntimeError):
    """One strategy of a comparison (``lorakit yolo compare``) failed to train; the strategies
    finished before it are kept, so running the comparison again goes on from there."""


class MetaTensorError(LoraError, ValueError):
    """A tensor that must hold data is on the meta device (an unmaterialised model)."""


def check_materialised(tensor: object, what: str, outcome: str) -> None:
    """Raise :class:`MetaTensorError` naming ``what`` and ``outcome`` (what was not done)
    if ``tensor`` is a meta tensor.

    Merging, saving and loading read or write values, which meta tensors do not have.
    """
    if getattr(tensor, "is_meta", False):
        raise MetaTensorError(
            f"{what} is on the meta device (no data), so {outcome}; materialise the model first, e.g. "
            "model.to_empty(device='cpu') and load its weights"
        )


class MissingExtraError(LoraError, ImportError):
    """An integration's package is not installed; the message is one line naming the pip extra."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` (``pip install "lorakit[extra]"``) unless ``module`` can be imported.

    Looks the module up without importing it (``importlib.util.find_spec``), so it can run before
    ``lorakit.yolo.offline.enable()``, which must precede ``import ultralytics``.
    """
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install (sys.modules[module] = None)
        found = False
    if not found:
        raise MissingExtraError(
            f'{what} needs {module}, which is not installed; install it with: pip install "lorakit[{extra}]"'
        )


def did_you_mean(word: str, known: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'epochs'?"`` for the close matches of a mistyped ``word`` among ``known``
    (difflib's ratio >= 0.6), or ``""`` when nothing is close: the hint every typo error appends
    (configs, CLI keys and verbs)."""
    close = difflib.get_close_matches(word, sorted(known), n=n, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
