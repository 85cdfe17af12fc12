"""Which adaptation strategies a comparison runs: fixed names, rank families, typo hints.

A :class:`Catalogue` knows fixed names (``full``, ``head``, ``dora``...) and rank
families (``lora-r`` takes ``lora-r4``, ``lora-r16``, any rank >= 1), and picks
the strategies a user asked for (``strategies="full,lora-r8"``) or its default set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Catalogue:
    """The strategy names one integration can run.

    Args:
        fixed: ``{name: description}``.
        families: ``{prefix: description with {r}}``: ``prefix`` followed by a rank (an int >= 1).
        default: the names run when none are picked.
        key: the setting's name in messages (``strategies``).
    """

    fixed: Mapping[str, str]
    families: Mapping[str, str]
    default: tuple[str, ...]
    key: str = "strategies"

    def rank(self, name: str) -> tuple[str, int] | None:
        """``(prefix, r)`` when ``name`` is a rank family's (``lora-r8`` -> ``("lora-r", 8)``), else ``None``."""
        for prefix in self.families:
            m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
            if m and int(m.group(1)) >= 1:
                return prefix, int(m.group(1))
        return None

    def describe(self, name: str) -> str:
        """The strategy's description (``LoRA, r=8``)."""
        if name in self.fixed:
            return self.fixed[name]
        family = self.rank(name)
        if family is None:
            raise ConfigError(self._unknown(name))
        return self.families[family[0]].format(r=family[1])

    def pick(self, spec: str | Sequence[str] | None) -> list[str]:
        """The names ``spec`` asks for, in its order (``None``: :attr:`default`).

        ``spec`` is a comma-separated string or a sequence of names.

        Raises:
            ConfigError: an unknown name (with its close matches), a name given twice, or none at all.
        """
        if spec is None:
            return list(self.default)
        names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
        names = [n for n in names if n]
        if not names:
            raise ConfigError(f"{self.key}=: no strategy named; known: {', '.join(self.known())}")
        for name in names:
            if name not in self.fixed and self.rank(name) is None:
                raise ConfigError(self._unknown(name))
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{self.key}=: {', '.join(repr(n) for n in twice)} named more than once")
        return names

    def known(self) -> list[str]:
        """Fixed names, the default set and one example per family (what a hint may suggest)."""
        examples = [f"{p}N" for p in self.families]
        return list(dict.fromkeys([*self.fixed, *self.default, *examples]))

    def _unknown(self, name: str) -> str:
        close = [*self.fixed, *self.default, *(f"{p}{r}" for p in self.families for r in (4, 8, 16))]
        hint = did_you_mean(name, set(close))
        return f"{self.key}=: unknown strategy {name!r}{hint} (known: {', '.join(self.known())}; N is a rank >= 1)"
