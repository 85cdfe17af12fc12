"""PEFT's on-disk layout: tensor key names and ``adapter_config.json`` <->
:class:`~lorakit.config.LoraConfig`. What a layer type stores differently (its keys, the
form of its factors: a grouped conv's dense A) is its handler's
(:attr:`~lorakit.layers.base.LayerHandler.file_keys`, ``to_file``/``from_file``).

Keys (``<p>`` = module path)::

    Linear, ConvNd      base_model.model.<p>.lora_A.weight      base_model.model.<p>.lora_B.weight
    Embedding           base_model.model.<p>.lora_embedding_A   base_model.model.<p>.lora_embedding_B
    DoRA (any type)     base_model.model.<p>.lora_magnitude_vector  (shape: the handler's magnitude_shape)
    train_modules       base_model.model.<module>.<param>      (full copies: PEFT's modules_to_save)
    biases (bias!=none) base_model.model.<p>.base_layer.bias    (adapted layers; other modules: <p>.bias)
    other layer types  base_model.model.<p>.lora_A.weight      base_model.model.<p>.lora_B.weight
                       (unless their handler names other keys)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import nn

from . import peft_names
from .config import LoraConfig
from .errors import ConfigError
from .io_errors import AdapterConfigError
from .layers.base import LoraAdapter, LoraLayer, handler_file_keys
from .peft_names import is_svd_init
from .registry import LayerHandler
from .variants import VARIANTS

PREFIX = "base_model.model."

# Which PEFT field means what (read, skipped, refused unless off): lorakit.peft_names.
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights alone


def factor_keys(path: str, handler: LayerHandler) -> tuple[str, str]:
    """The file keys of A and B on the layer at ``path``: the handler's :attr:`~LayerHandler.file_keys`."""
    base = PREFIX + (path + "." if path else "")
    a, b = handler.file_keys
    return base + a, base + b


def variant_keys(path: str, variant: str) -> dict[str, str]:
    """The file keys of a variant's extra tensors on the layer at ``path`` -> the adapter attribute
    (DoRA: ``base_model.model.<p>.lora_magnitude_vector`` -> ``magnitude``, PEFT's key)."""
    base = PREFIX + (path + "." if path else "")
    return {base + k: attr for k, attr in VARIANTS[variant].file_keys.items()}


def factor_key_test() -> Callable[[str], bool]:
    """A test for the keys of LoRA factors (as :func:`factor_keys` and :func:`variant_keys` name them),
    whose tensors must be floating point. It knows the layer types and variants registered now: each
    type's A and B (:func:`~lorakit.layers.base.handler_file_keys`, a user's layer type included) and
    each variant's extra tensors (DoRA's magnitude)."""
    suffixes = handler_file_keys() | {k for v in VARIANTS.values() for k in v.file_keys}

    def is_factor_key(key: str) -> bool:
        if not key.startswith(PREFIX):
            return False
        parts = key[len(PREFIX) :].split(".")
        return any(".".join(parts[i:]) in suffixes for i in range(len(parts)))  # dot-boundary suffixes

    return is_factor_key


# -- config: lorakit -> PEFT --------------------------------------------------------------


def _peft_selects(target: set[str], name: str) -> bool:
    """PEFT's list rule: ``name`` is a target or ends with ``"." + target``, i.e. one of its dotted suffixes is
    (a set lookup per suffix: models have hundreds of modules and targets)."""
    parts = name.split(".")
    return any(".".join(parts[i:]) in target for i in range(len(parts)))


def _pattern_key(path: str, others: list[str]) -> str:
    """A PEFT rank/alpha_pattern key matching ``path`` only (PEFT matches ``(.*\\.)?(key)$``)."""
    key = re.escape(path)
    if any(o != path and re.match(rf"(.*\.)?({key})$", o) for o in others):
        key = "^" + key
    return key


def to_peft_config(
    model: nn.Module, config: LoraConfig, adapted: list[tuple[str, LoraAdapter]], train_paths: list[str]
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict describing exactly the ``adapted`` layers."""
    paths = [p for p, _ in adapted]
    names = [n for n, _ in model.named_modules()]
    r = Counter(ad.r for _, ad in adapted).most_common(1)[0][0]
    alpha = Counter(ad.alpha for _, ad in adapted).most_common(1)[0][0]
    target: list[str] | str = sorted(paths)
    chosen = set(paths)
    if {n for n in names if _peft_selects(chosen, n)} != chosen:
        target = "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
    rank_pattern = {_pattern_key(p, paths): ad.r for p, ad in adapted if ad.r != r}
    alpha_pattern = {_pattern_key(p, paths): _num(ad.alpha) for p, ad in adapted if ad.alpha != alpha}
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": config.bias,
        # PEFT wants True for (in, out)-stored layers (Conv1D) and warns otherwise.
        "fan_in_fan_out": all(cast(LoraLayer, model.get_submodule(p)).lora_handler.fan_in_fan_out for p in paths),
        "inference_mode": True,
        "init_lora_weights": peft_names.init_to_peft(config.init),
        "lora_alpha": _num(alpha),
        "lora_dropout": config.dropout,
        "modules_to_save": sorted(train_paths) or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "target_modules": target,
        "task_type": None,
        "use_dora": config.dora,
        "use_rslora": config.use_rslora,
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


# -- config: PEFT -> lorakit --------------------------------------------------------------


def from_peft_config(
    file: Path, raw: object, strict: bool, fingerprinted: bool = False
) -> tuple[LoraConfig, list[str]]:
    """LoraConfig for a PEFT ``adapter_config.json`` dict, and the unknown keys found.

    ``fingerprinted``: the file carries lorakit's base fingerprint, which will be checked; then a
    PiSSA/OLoRA adapter loads (onto the residual base it was saved on, which the check ensures).

    Raises:
        AdapterConfigError: not a LoRA config; unknown keys (``strict``); a feature lorakit
            cannot reproduce (lora_bias, base-changing inits without ``fingerprinted``, ...);
            invalid values.
    """
    if not isinstance(raw, dict):
        raise AdapterConfigError(file, "adapter_config.json must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        raise AdapterConfigError(file, f"peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    unknown = sorted(set(raw) - peft_names.PEFT_FIELDS)
    if unknown and strict:
        raise AdapterConfigError(file, f"unknown config keys {unknown} (strict=False loads anyway and reports them)")
    for key, what in peft_names.UNSUPPORTED.items():
        if raw.get(key) not in peft_names.OFF:
            raise AdapterConfigError(file, f"{key}={raw[key]!r}: {what} is not supported by lorakit")
    init = raw.get("init_lora_weights", True)
    if init not in _SAFE_INITS and not (fingerprinted and is_svd_init(init)):
        raise AdapterConfigError(
            file,
            f"init_lora_weights={init!r} changes the base weights when PEFT loads the adapter; lorakit cannot "
            "reproduce that (convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion, or save "
            "it from lorakit with save_adapter(..., original_base=True))",
        )
    target = raw.get("target_modules")
    if not (
        isinstance(target, str) or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))
    ):
        raise AdapterConfigError(file, f"target_modules must be a regex string or a list of names, got {target!r}")
    exclude = raw.get("exclude_modules")
    if not (
        exclude is None
        or isinstance(exclude, str)
        or (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude))
    ):
        raise AdapterConfigError(
            file, f"exclude_modules must be a regex string or a list of names, got {exclude!r:.80}"
        )
    train = raw.get("modules_to_save")
    if not (train is None or (isinstance(train, list) and all(isinstance(t, str) for t in train))):
        raise AdapterConfigError(file, f"modules_to_save must be a list of module names, got {train!r:.80}")

    def patterns(field: str) -> dict[str, Any]:
        value = raw.get(field) or {}
        if not isinstance(value, dict):
            raise AdapterConfigError(file, f"{field} must be an object, got {value!r}")
        return {rf"re:(.*\.)?({k})": v for k, v in value.items()}

    try:
        # PEFT's names: LoraConfig maps them (string target/exclude_modules are regexes there too)
        cfg = LoraConfig(
            r=raw.get("r", 8),
            lora_alpha=raw.get("lora_alpha", 8),
            lora_dropout=raw.get("lora_dropout", 0.0),
            target_modules=target,
            exclude_modules=exclude,
            rank_pattern=patterns("rank_pattern"),
            alpha_pattern=patterns("alpha_pattern"),
            use_rslora=raw.get("use_rslora", False),
            use_dora=raw.get("use_dora", False),
            bias=raw.get("bias", "none"),
            modules_to_save=train,
        )
    except (ConfigError, TypeError) as exc:
        raise AdapterConfigError(file, str(exc)) from None
    return cfg, unknown


def scaling_of(r: int, alpha: float, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)
