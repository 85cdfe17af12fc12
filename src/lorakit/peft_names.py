"""PEFT's ``LoraConfig`` vocabulary: the one home of the PEFT <-> lorakit names.

:class:`~lorakit.config.LoraConfig` accepts PEFT's keywords through this module, and
:mod:`lorakit.io_peft` reads and writes ``adapter_config.json`` with it. Every field of
PEFT 0.21's ``LoraConfig`` but ``peft_type`` (``"LORA"``) is in exactly one of these tables:

* :data:`RENAMED`, :data:`SAME`: the same setting under PEFT's name or the same name;
* :data:`NO_EFFECT`: nothing to do when reading a file (metadata, PEFT's wrapper class,
  the storage order PEFT reads from the layer, settings of features that are off): the
  reader skips them. The constructor takes ``task_type``, ``inference_mode`` and
  ``fan_in_fan_out`` with the values for which nothing changes (:func:`translate`) and
  refuses the others by name;
* :data:`UNSUPPORTED`: a feature lorakit does not implement: a file must have it off
  (:data:`OFF`); the constructor refuses them by name.

Pattern semantics follow the name: PEFT's ``target_modules``/``exclude_modules`` given
as one string are PEFT's regex (full match on the module path) unless it is
``"all-linear"``; given as a list they are names matched as a path or its dot-suffix,
which is lorakit's rule for plain names too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, cast

from .errors import ConfigError, did_you_mean

# The inits that factor the base weight (lorakit.init_svd): one name for them in lorakit and PEFT.
PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)")
SVD_INITS = ("pissa", "pissa_niter_N", "olora")  # the names, for messages


def is_svd_init(init: object) -> bool:
    """True for ``"pissa"``, ``"pissa_niter_<N>"`` (N a non-negative int) and ``"olora"``."""
    return isinstance(init, str) and (init in ("pissa", "olora") or PISSA_NITER.fullmatch(init) is not None)


# PEFT keyword -> the lorakit field with the same meaning.
RENAMED: dict[str, str] = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "modules_to_save": "train_modules",
    "init_lora_weights": "init",
    "use_dora": "dora",
}
# Same name and meaning in both (rank/alpha_pattern keys use lorakit's pattern rules, which
# agree with PEFT's for plain names; a PEFT regex key needs lorakit's "re:" prefix).
SAME = ("r", "rank_pattern", "alpha_pattern", "use_rslora", "bias")

# init_lora_weights -> lorakit init. True: A Kaiming-uniform (a=sqrt(5)), B = 0; "gaussian":
# A ~ N(0, 1/r), B = 0; False: A and B both Kaiming-uniform (nn.Linear's default), not a no-op.
# "pissa", "pissa_niter_<N>", "olora" (lorakit.init_svd.is_svd_init) keep their name in both.
INIT_FROM_PEFT: dict[bool | str, str] = {True: "kaiming", "gaussian": "gaussian", False: "random"}
INIT_TO_PEFT: dict[str, bool | str] = {v: k for k, v in INIT_FROM_PEFT.items()}

# PEFT fields with nothing for lorakit to do.
NO_EFFECT = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "task_type",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config",
    "eva_config", "runtime_config", "layers_pattern",
})  # fmt: skip
# PEFT fields that switch on something lorakit cannot do: name -> what it is.
UNSUPPORTED: dict[str, str] = {
    "lora_bias": "LoRA biases (lora_B.bias)", "use_qalora": "QALoRA",
    "layers_to_transform": "layers_to_transform", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA", "use_bdlora": "BD-LoRA", "megatron_config": "Megatron layers",
    "corda_config": "CorDA", "lora_ga_config": "LoRA-GA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
}  # fmt: skip
OFF: tuple[object, ...] = (None, False, [], {})  # an UNSUPPORTED field at one of these values asks for nothing
PEFT_FIELDS = frozenset({"peft_type", *RENAMED, *SAME, *NO_EFFECT, *UNSUPPORTED})

# PEFT task types that only choose PEFT's wrapper class; the others also train the model's head.
_PLAIN_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
_HEAD_TASKS = {"SEQ_CLS": "classifier/score", "TOKEN_CLS": "classifier/score", "QUESTION_ANS": "qa_outputs"}


def patterns_from_peft(value: object) -> object:
    """PEFT's ``target_modules``/``exclude_modules`` as lorakit patterns: one string is a
    regex (``"re:" + value``) unless it is ``"all-linear"``; anything else passes unchanged
    (a list of names means the same in both; LoraConfig checks the rest)."""
    if isinstance(value, str) and value != "all-linear":
        return "re:" + value
    return value


def init_from_peft(value: object) -> str:
    """lorakit's ``init`` for PEFT's ``init_lora_weights`` value.

    Raises:
        ConfigError: a value lorakit does not implement (named).
    """
    if isinstance(value, (bool, str)) and value in INIT_FROM_PEFT:
        return INIT_FROM_PEFT[value]
    if is_svd_init(value):
        return cast(str, value)
    raise ConfigError(
        f"LoraConfig: init_lora_weights={value!r} is not implemented in lorakit; use True (lorakit's init='kaiming'), "
        "False ('random'), 'gaussian', 'pissa', 'pissa_niter_N' or 'olora'"
    )


def init_to_peft(init: str) -> bool | str:
    """PEFT's ``init_lora_weights`` for lorakit's ``init``."""
    return INIT_TO_PEFT.get(init, init)


def check_keywords(given: Collection[str], known: Collection[str]) -> None:
    """Refuse, before the dataclass ``__init__`` would with a bare ``TypeError``, a keyword
    ``LoraConfig`` does not take, and a field ``given`` under both its names.

    Raises:
        ConfigError: a PEFT option lorakit does not implement (named, with what it is);
            an unknown keyword (with the close known names); both spellings of one field.
    """
    for name in given:
        if name in known:
            continue
        if name in UNSUPPORTED:
            raise ConfigError(f"LoraConfig: PEFT's {name} ({UNSUPPORTED[name]}) is not implemented in lorakit")
        if name in PEFT_FIELDS:
            raise ConfigError(
                f"LoraConfig: PEFT's {name} has no lorakit counterpart (it is PEFT's file metadata or a setting of "
                "a PEFT feature lorakit does not implement); leave it out"
            )
        raise ConfigError(f"LoraConfig: unknown keyword {name!r}{did_you_mean(name, known)}")
    for peft, ours in RENAMED.items():
        if peft in given and ours in given:
            raise clash_error("LoraConfig", peft)


def clash_error(where: str, peft: str) -> ConfigError:
    """The error for a field given under PEFT's name ``peft`` and under lorakit's."""
    ours = RENAMED[peft]
    return ConfigError(f"{where}: {ours}= and {peft}= are one field (PEFT's {peft} is lorakit's {ours}); give only one")


def rename(where: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with PEFT's :data:`RENAMED` keywords under lorakit's names and meanings, for
    a caller that reads those fields before LoraConfig does (``where`` names it in errors).
    Other keywords pass unchanged; a PEFT name set to None is dropped (not given).

    Raises:
        ConfigError: a field under both names; a value lorakit does not implement (:func:`translate`).
    """
    out = {k: v for k, v in kwargs.items() if k not in RENAMED}
    for peft, ours in RENAMED.items():
        if kwargs.get(peft) is not None:
            if ours in kwargs:
                raise clash_error(where, peft)
            out.update(translate({peft: kwargs[peft]}))
    return out


def translate(values: Mapping[str, Any]) -> dict[str, Any]:
    """lorakit ``{field: value}`` for PEFT-named keywords (``None`` values are "not given").

    Raises:
        ConfigError: a value whose PEFT meaning lorakit does not implement, naming it:
            an ``init_lora_weights`` value (see
            :func:`init_from_peft`), ``task_type`` of a task for which PEFT also trains
            the head, ``inference_mode=True``, a non-bool ``fan_in_fan_out``.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name == "init_lora_weights":
            out["init"] = init_from_peft(value)
        elif name in ("target_modules", "exclude_modules"):
            out[RENAMED[name]] = patterns_from_peft(value)
        elif name in RENAMED:
            out[RENAMED[name]] = value
        elif name == "task_type":
            _check_task(value)
        elif name == "inference_mode":
            if value is not False:
                raise ConfigError(
                    f"LoraConfig: inference_mode={value!r}: lorakit has no frozen-adapter mode; its adapters "
                    "train, and model.requires_grad_(False) freezes them"
                )
        elif name == "fan_in_fan_out":
            # PEFT replaces the flag by each layer's own storage order (with a warning); lorakit
            # reads that order from the layer's class, so either value ends where PEFT's does.
            if not isinstance(value, bool):
                raise ConfigError(f"LoraConfig: fan_in_fan_out must be True or False, got {value!r}")
        else:  # pragma: no cover - LoraConfig passes only RENAMED and ACCEPTED names
            raise ConfigError(f"LoraConfig: {name} is not a PEFT keyword lorakit takes")
    return out


def _check_task(value: object) -> None:
    # PEFT's TaskType is a str enum: it compares and hashes as its value
    if isinstance(value, str) and value in _HEAD_TASKS:
        raise ConfigError(
            f"LoraConfig: task_type={value!r}: for this task PEFT also trains the model's {_HEAD_TASKS[value]} head; "
            "lorakit trains only what you name: put the head in train_modules (PEFT: modules_to_save) and leave "
            "task_type out"
        )
    if not (isinstance(value, str) and value in _PLAIN_TASKS):
        raise ConfigError(f"LoraConfig: task_type must be one of {_PLAIN_TASKS} (or left out), got {value!r}")
