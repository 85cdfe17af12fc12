"""``key=value`` argument parsing shared by every verb."""

from __future__ import annotations

import ast
from typing import Any

from ..errors import LoraError


class ArgError(LoraError, ValueError):
    """A command-line argument is malformed or unknown."""


def parse_value(text: str) -> Any:
    """``8`` -> 8, ``0.5`` -> 0.5, ``True`` -> True, ``[1,2]`` -> [1, 2],
    ``a,b`` -> ['a', 'b'], anything else -> the string itself. Never evaluates code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return [part for part in text.split(",") if part]
    return text


def wants_help(argv: list[str]) -> bool:
    """``lorakit VERB --help`` (or ``-h``, ``help``): the verb prints its usage instead of running."""
    return bool(argv) and argv[0] in ("-h", "--help", "help")


def parse_args(argv: list[str], allowed: set[str], verb: str) -> dict[str, Any]:
    """Parse ``key=value`` tokens; unknown keys and tokens without ``=`` raise ArgError."""
    out: dict[str, Any] = {}
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ArgError(f"expected key=value, got {token!r}")
        if key not in allowed:
            raise ArgError(f"unknown key {key!r} for '{verb}'; known keys: {', '.join(sorted(allowed))}")
        out[key] = parse_value(value)
    return out
