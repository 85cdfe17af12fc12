"""Typed errors for adapter files. Every one names the file it is about.

All derive from :class:`AdapterFileError` (a :class:`~lorakit.errors.LoraError`
and a ``ValueError``), so ``except ValueError`` keeps working; ``path`` holds
the file or folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, LoraError, NonFiniteError


class AdapterFileError(LoraError, ValueError):
    """An adapter file is missing, unreadable or malformed. The message starts with the path."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


class UnsafeFormatError(AdapterFileError):
    """A pickle-based file (``.bin``/``.pt``/``.pth``) was refused: unpickling can run code."""


class AdapterConfigError(AdapterFileError, ConfigError):
    """``adapter_config.json`` is invalid, has unknown keys, or asks for something lorakit cannot do."""


class KeyMismatchError(AdapterFileError):
    """Tensor names in the file and the adapter the config builds disagree.

    ``missing``: expected by the model but not in the file; ``unexpected``: in the file
    but not expected.
    """

    def __init__(self, path: str | Path, missing: Sequence[str], unexpected: Sequence[str], hint: str = "") -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_short(self.unexpected)}")
        super().__init__(path, "; ".join(parts) + (f". {hint}" if hint else ""))


class ShapeMismatchError(AdapterFileError):
    """A tensor's shape differs from the shape the model and config need."""

    def __init__(
        self, path: str | Path, key: str, expected: Sequence[int], actual: Sequence[int], hint: str = ""
    ) -> None:
        self.key = key
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(
            path,
            f"tensor {key!r} has shape {list(self.actual)}, expected {list(self.expected)}"
            + (f" ({hint})" if hint else ""),
        )


class BaseModelMismatchError(AdapterFileError):
    """The adapter was saved on other base weights (its fingerprint differs). ``layers`` lists what differs."""

    def __init__(self, path: str | Path, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        super().__init__(
            path,
            "the adapter was saved on a different base model: the base weights of "
            f"{len(self.layers)} adapted layer(s) differ from the ones it was trained on: {_short(self.layers, 8)}. "
            "Pass allow_other_base=True to load it anyway",
        )


class DtypeMismatchError(AdapterFileError):
    """A tensor's dtype is not one that tensor may have (an integer or float8 LoRA factor, an
    integer bias, a float where the model keeps an integer buffer, ...)."""

    def __init__(self, path: str | Path, key: str, expected: str, actual: str, hint: str = "") -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(
            path, f"tensor {key!r} has dtype {actual}, expected {expected}" + (f" ({hint})" if hint else "")
        )


class NonFiniteTensorError(AdapterFileError, NonFiniteError):
    """A tensor in the file holds NaN or Inf."""


def _short(items: Sequence[str], n: int = 20) -> str:
    shown = ", ".join(repr(s) for s in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})" if len(items) > n else f"[{shown}]"
