"""Checks of the settings of a YOLO run.

:func:`as_patterns` reads ``exclude=``-like arguments: a string is one pattern.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError


def as_patterns(key: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``value`` as a tuple of module path patterns: a string is one pattern, never its
    characters (``"model.0.conv"`` -> ``("model.0.conv",)``); ``None`` is none.

    Raises:
        ConfigError: ``value`` is neither a string nor an iterable of strings (naming ``key``).
    """
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ConfigError(f"{key}: expected a path pattern or a list of them, got {value!r}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{key}: expected path patterns (strings), got {bad[0]!r} in {value!r}")
    return patterns
