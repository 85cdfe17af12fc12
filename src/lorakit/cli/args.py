"""``key=value`` argument parsing shared by every verb."""

from __future__ import annotations

import ast
from typing import Any

from ..errors import ArgError as ArgError  # defined with the other errors; imported from here by every verb
from ..errors import did_you_mean as did_you_mean  # lives with the errors whose messages it completes


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
    """Parse ``key=value`` tokens.

    Raises:
        ArgError: a token without ``=``, or an unknown key (naming the close matches and every known key).
    """
    out: dict[str, Any] = {}
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ArgError(f"expected key=value, got {token!r}")
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise ArgError(f"unknown key {key!r} for '{verb}'{hint}; known keys: {', '.join(sorted(allowed))}")
        out[key] = parse_value(value)
    return out
