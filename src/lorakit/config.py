"""LoraConfig: what to adapt and how, as one frozen, typed value.

Target patterns (``targets``, ``exclude``, ``train_modules`` and the keys of
``rank_pattern``/``alpha_pattern``) match module paths such as
``encoder.layer.3.attention.self.query``:

* ``"query"``            exact path, or a dot-boundary suffix of it
                         (matches ``...self.query``, not ``...self.my_query``);
* ``"layer.*.query"``    a glob (``* ? [..]``) on the whole path, or on a suffix
                         that starts after a dot;
* ``"re:.*\\.(q|v)$"``   a regular expression, full match on the whole path;
* ``"all-linear"``       (``targets`` only) every ``nn.Linear``-like layer
                         except the model's output head
                         (``model.get_output_embeddings()`` when it exists).

``target_types`` selects by layer type: class names (``"Conv2d"``, matched
against the layer's class and its bases) or classes.

PEFT's field names work too (``lora_alpha``, ``target_modules``, ...): the mapping and
what each PEFT value means here are in :mod:`lorakit.peft_names`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, InitVar, asdict, dataclass, field, fields
from typing import Any, cast

from . import peft_names
from .errors import ConfigError
from .peft_names import SVD_INITS, is_svd_init

INITS = ("kaiming", "gaussian", "random")
BIASES = ("none", "all", "lora_only")
BATCHNORMS = ("frozen", "update")
ALL_LINEAR = "all-linear"
_GLOB_CHARS = frozenset("*?[")


def _check_pattern(field_name: str, pattern: object) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"LoraConfig.{field_name}: patterns must be non-empty strings, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"LoraConfig.{field_name}: regex {pattern[3:]!r} does not compile: {exc}") from None
    return pattern


def match_pattern(pattern: str, name: str) -> bool:
    """True when module path ``name`` matches ``pattern`` (rules in the module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


class PatternSet:
    """Patterns read once, then matched against many module paths (same rules as :func:`match_pattern`).

    Plain patterns are looked up by the path's dot-boundary suffixes (``a.b.c`` -> ``a.b.c``,
    ``b.c``, ``c``): one set probe per path depth, not one comparison per pattern. An
    adapter saved with explicit paths names a hundred layers, and a model has about a
    thousand modules, so comparing each pair made loading such an adapter slow.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        ordered = list(dict.fromkeys(patterns))
        self._rank = {p: i for i, p in enumerate(ordered)}
        self._plain = {p for p in ordered if not is_wildcard(p)}
        self._wild = [p for p in ordered if is_wildcard(p)]

    def matches(self, name: str) -> bool:
        """Whether any of the patterns matches ``name``."""
        if self._plain:
            parts = name.split(".")
            if any(".".join(parts[i:]) in self._plain for i in range(len(parts))):
                return True
        return any(match_pattern(p, name) for p in self._wild)

    def matching(self, name: str) -> list[str]:
        """The patterns matching ``name``, in their given order (each once)."""
        hits = [p for p in self._wild if match_pattern(p, name)]
        if self._plain:
            parts = name.split(".")
            hits += [s for s in (".".join(parts[i:]) for i in range(len(parts))) if s in self._plain]
        return sorted(hits, key=self._rank.__getitem__)


def is_wildcard(pattern: str) -> bool:
    """Glob and regex patterns may match layers lorakit cannot adapt; those are skipped."""
    return pattern.startswith("re:") or bool(_GLOB_CHARS & set(pattern))


def as_strings(key: str, value: object, what: str) -> tuple[str, ...]:
    """``value`` as a tuple of strings: one string is one ``what``, never its characters
    (``"model.0.conv"`` -> ``("model.0.conv",)``).

    Raises:
        ConfigError: ``value`` is neither a string nor an iterable of strings (naming ``key``).
    """
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(cast(Iterable[object], value))
    except TypeError:
        raise ConfigError(f"{key}: expected a {what} or a list of them, got {value!r}") from None
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{key}: expected {what}s (strings), got {bad[0]!r} in {value!r}")
    return cast(tuple[str, ...], items)


def as_patterns(key: str, value: object) -> tuple[str, ...]:
    """``value`` as a tuple of module path patterns (:func:`as_strings`); ``None`` is none."""
    return () if value is None else as_strings(key, value, "path pattern")


def _as_types(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"LoraConfig.target_types: expected class names or classes, got {value!r}") from None


@dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA.

    Each adapted layer with weight ``W`` gets two factors, ``A`` (r x fan_in) and
    ``B`` (fan_out x r), and computes ``y = W x + b + s * B (A dropout(x))``
    with scaling ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
    ``W`` is frozen; only ``A`` and ``B`` train, so a layer of ``out x in``
    weights trains ``r * (in + out)`` numbers instead of ``in * out``.

    Args:
        r: rank, an int > 0 (default 8).
        alpha: scaling numerator, > 0. ``None`` (default) means ``alpha = r``, so s = 1.
        dropout: dropout probability on the LoRA branch input, in [0, 1). Default 0.
        targets: module path patterns to adapt (see module docstring), or ``"all-linear"``.
        target_types: layer types to adapt, as class names or classes.
        exclude: path patterns never adapted; wins over ``targets`` and ``target_types``.
        rank_pattern: ``{pattern: r}`` per-module rank overrides; first match in order wins.
        alpha_pattern: ``{pattern: alpha}`` per-module alpha overrides.
        use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
        init: ``"kaiming"`` (A Kaiming-uniform, a=sqrt(5), as nn.Linear; B = 0),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``"random"`` (both random, so the
            adapter is *not* a no-op at start: meant for tests), or ``"pissa"``,
            ``"pissa_niter_N"``, ``"olora"``: A, B from the base weight's top singular
            vectors (or QR), and the base weight replaced by the rest (:mod:`lorakit.init_svd`).
        bias: ``"none"`` (default; no bias trains), ``"all"`` (every bias in the model
            trains) or ``"lora_only"`` (biases of adapted layers train). The adapter
            trains its own copies of them (:mod:`lorakit.owned`); the base keeps its own.
        train_modules: path patterns of modules trained fully (e.g. a new classifier
            head): the adapter gets its own copy of each, installed while it is active,
            and saves it with its factors. The base and other adapters keep theirs.
        batchnorm: ``"frozen"`` (default): every BatchNorm layer of the model runs
            in eval mode, also during ``model.train()``, so its running statistics
            never change and the base model stays exactly the base model.
            ``"update"``: BatchNorm behaves as usual (statistics move in training).
        dora: DoRA (weight-decomposed LoRA, :mod:`lorakit.variants`): each adapted layer
            also trains a magnitude per output channel, ``W' = m (W + s B A) / ||W + s B A||_c``.
            Linear, transformers' Conv1D, ungrouped Conv1d/2d/3d and Embedding; other layer
            types (and grouped convs) are refused at inject. No mixed batches.

    PEFT's names, keyword-only, for PEFT users (:mod:`lorakit.peft_names`): ``lora_alpha``
    (alpha), ``lora_dropout`` (dropout), ``target_modules`` (targets; one string is PEFT's
    regex), ``exclude_modules`` (exclude), ``modules_to_save`` (train_modules),
    ``init_lora_weights`` (True, False, ``"gaussian"``: init ``"kaiming"``, ``"random"``,
    ``"gaussian"``; ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``: the same name),
    ``use_dora`` (dora), ``task_type`` (tasks without a head),
    ``inference_mode`` (False only), ``fan_in_fan_out`` (read from each layer anyway).
    They are not stored: the config equals the one spelled with lorakit's names, and
    ``to_dict`` writes lorakit's. ``dataclasses.replace`` takes lorakit's names (it passes
    every field, so a PEFT name there names a field twice).

    Raises:
        ConfigError (a ``ValueError``) naming the field and the value when a value is invalid;
        naming the keyword for a PEFT option lorakit does not implement, an unknown keyword
        (with close known names), or one field given under both names.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    # Sequences in, tuples stored (see __post_init__), so YAML/CLI lists work too.
    targets: Sequence[str] = ()
    target_types: Sequence[str | type] = ()
    exclude: Sequence[str] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    train_modules: Sequence[str] = ()
    batchnorm: str = "frozen"
    dora: bool = False
    # PEFT's names (class docstring): read by __post_init__, never stored; None is "not given".
    _: KW_ONLY
    lora_alpha: InitVar[float | None] = None
    lora_dropout: InitVar[float | None] = None
    target_modules: InitVar[Sequence[str] | str | None] = None
    exclude_modules: InitVar[Sequence[str] | str | None] = None
    modules_to_save: InitVar[Sequence[str] | None] = None
    init_lora_weights: InitVar[bool | str | None] = None
    use_dora: InitVar[bool | None] = None
    task_type: InitVar[str | None] = None
    inference_mode: InitVar[bool | None] = None
    fan_in_fan_out: InitVar[bool | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> LoraConfig:
        # Runs before the dataclass __init__, which would refuse these keywords with a bare TypeError.
        # A PEFT name set to None is not given (dataclasses.replace passes every name, None for these).
        given = [f.name for f in fields(cls)][: len(args)]
        given += [k for k, v in kwargs.items() if not (v is None and k in peft_names.RENAMED)]
        peft_names.check_keywords(given, cls.__dataclass_fields__)
        return super().__new__(cls)

    def __post_init__(
        self,
        lora_alpha: float | None,
        lora_dropout: float | None,
        target_modules: Sequence[str] | str | None,
        exclude_modules: Sequence[str] | str | None,
        modules_to_save: Sequence[str] | None,
        init_lora_weights: bool | str | None,
        use_dora: bool | None,
        task_type: str | None,
        inference_mode: bool | None,
        fan_in_fan_out: bool | None,
    ) -> None:
        peft = {
            "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "target_modules": target_modules,
            "exclude_modules": exclude_modules, "modules_to_save": modules_to_save,
            "init_lora_weights": init_lora_weights, "use_dora": use_dora, "task_type": task_type,
            "inference_mode": inference_mode, "fan_in_fan_out": fan_in_fan_out,
        }  # fmt: skip
        for name, value in peft_names.translate(peft).items():
            object.__setattr__(self, name, value)
        # Messages name the keyword the caller wrote.
        shown = {ours: p for p, ours in peft_names.RENAMED.items() if peft[p] is not None}

        def key(name: str) -> str:
            return shown.get(name, name)

        # Normalise list/str inputs to tuples so configs read from YAML, JSON or a
        # CLI compare equal to ones written in Python.
        for name in ("targets", "exclude", "train_modules"):
            object.__setattr__(self, name, as_patterns(f"LoraConfig.{key(name)}", getattr(self, name)))
        object.__setattr__(self, "target_types", _as_types(self.target_types))
        _check_rank("r", self.r)
        if self.alpha is not None:
            _check_alpha(key("alpha"), self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise ConfigError(f"LoraConfig.{key('dropout')} must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS and not is_svd_init(self.init):
            raise ConfigError(f"LoraConfig.init must be one of {INITS + SVD_INITS}, got {self.init!r}")
        if self.bias not in BIASES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIASES}, got {self.bias!r}")
        if self.batchnorm not in BATCHNORMS:
            raise ConfigError(f"LoraConfig.batchnorm must be one of {BATCHNORMS}, got {self.batchnorm!r}")
        if not isinstance(self.dora, bool):
            raise ConfigError(f"LoraConfig.{key('dora')} must be a bool, got {self.dora!r}")
        if self.dora and is_svd_init(self.init):
            raise ConfigError(f"LoraConfig: dora=True with init={self.init!r} is not implemented; use one or the other")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        for name in ("targets", "exclude", "train_modules"):
            for p in getattr(self, name):
                _check_pattern(key(name), p)
        for t in self.target_types:
            if not (isinstance(t, str) and t) and not isinstance(t, type):
                raise ConfigError(f"LoraConfig.target_types: expected class names or classes, got {t!r}")
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"LoraConfig.{name} must be a mapping of pattern -> value, got {value!r}")
            for key, v in value.items():
                _check_pattern(name, key)
                check(f"{name}[{key!r}]", v)
            object.__setattr__(self, name, dict(value))
        if not self.targets and not self.target_types:
            raise ConfigError(
                "LoraConfig: nothing to target; set targets (e.g. ['q_proj', 'v_proj'] or 'all-linear') "
                "or target_types (e.g. ['Conv2d'])"
            )

    # -- per-module values -------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """Rank of module ``name``: the first matching ``rank_pattern`` entry, else ``r``."""
        for pattern, r in self.rank_pattern.items():
            if match_pattern(pattern, name):
                return int(r)
        return self.r

    def alpha_for(self, name: str) -> float:
        """Alpha of module ``name``: the first matching ``alpha_pattern`` entry, else ``alpha`` (or r)."""
        for pattern, a in self.alpha_pattern.items():
            if match_pattern(pattern, name):
                return float(a)
        return float(self.alpha) if self.alpha is not None else float(self.rank_for(name))

    def scaling_for(self, name: str) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (classes in ``target_types`` become their names)."""
        d = asdict(self)
        for k in ("targets", "exclude", "train_modules"):
            d[k] = list(d[k])
        d["target_types"] = [t if isinstance(t, str) else t.__name__ for t in self.target_types]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> LoraConfig:
        """Build from a dict; unknown keys raise ConfigError naming them and ``source``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown LoraConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))


def finite_number(value: object) -> bool:
    """A real number as configs take it: an int or float (not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"LoraConfig.{field_name} must be an int > 0, got {value!r}")


def _check_alpha(field_name: str, value: object) -> None:
    if not finite_number(value) or not cast(float, value) > 0:
        raise ConfigError(f"LoraConfig.{field_name} must be a finite number > 0, got {value!r}")
