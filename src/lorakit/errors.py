"""Typed errors. Every lorakit error derives from :class:`LoraError`.

Each subclass also derives from the builtin a caller would naturally catch
(``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


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
