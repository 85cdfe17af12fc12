"""Default LoRA targets per transformers architecture family, and the task heads to keep out.

    family (config.model_type)              targets
    llama, mistral, qwen2, qwen3, gemma...  q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    gpt2                                    c_attn c_proj c_fc            (Conv1D, see lorakit.hf.conv1d)
    bert, roberta, vit, ...                 query key value, and the encoder layers' dense
                                            ("layer.*.dense": attention output, intermediate, output),
                                            never pooler.dense nor a classifier's dense
    vit (transformers >= 5 module names)    q_proj k_proj v_proj o_proj fc1 fc2

A family may list several name sets (module names changed between transformers
releases: ViT's ``attention.query`` became ``attention.q_proj``); the first set whose
every pattern matches a module of the model is used.

Heads (:func:`output_heads`): the output embedding (``get_output_embeddings()``, e.g.
``lm_head``) and the top-level task heads transformers adds (``classifier``, ``score``,
``qa_outputs``, ``cls``). ``"all-linear"`` in lorakit's core skips only the first;
:func:`lora_config` also excludes the others, and trains a freshly initialised
classification head fully (``train_modules``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import peft_names
from ..config import ALL_LINEAR, LoraConfig, as_patterns, match_pattern
from ..errors import TargetError

DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2 = ("c_attn", "c_proj", "c_fc")
ENCODER = ("query", "key", "value", "layer.*.dense")
ENCODER_V5 = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")

FAMILIES: dict[str, tuple[tuple[str, ...], ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text"),
        (DECODER,),
    ),
    "gpt2": (GPT2,),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), (ENCODER,)),
    **dict.fromkeys(("vit", "deit"), (ENCODER, ENCODER_V5)),
}
# Top-level attribute names transformers uses for task heads.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


def model_type(model: nn.Module) -> str:
    """``model.config.model_type`` (``""`` when the model has no transformers config)."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def default_targets(model: nn.Module) -> list[str]:
    """The LoRA target patterns for ``model``'s architecture family (module docstring table).

    Raises:
        TargetError: an unknown family; the message lists the known ones and suggests
            ``targets="all-linear"`` with :func:`lora_config`.
    """
    kind = model_type(model)
    if kind not in FAMILIES:
        raise TargetError(
            f"no default LoRA targets for model_type {kind or '<none>'!r} ({type(model).__name__}); known families: "
            f"{sorted(FAMILIES)}. Pass targets explicitly, or targets='all-linear' to lorakit.hf.lora_config"
        )
    names = [n for n, _ in model.named_modules() if n]
    for option in FAMILIES[kind]:
        if all(any(match_pattern(p, n) for n in names) for p in option):
            return list(option)
    raise TargetError(
        f"{type(model).__name__} (model_type {kind!r}) has none of the known module name sets {FAMILIES[kind]}; "
        "pass targets explicitly"
    )


def output_heads(model: nn.Module) -> list[str]:
    """Paths of ``model``'s output head(s): ``get_output_embeddings()`` and top-level task heads."""
    found: list[str] = []
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    for name, module in model.named_modules():
        if name and (module is head or name in HEAD_NAMES):
            found.append(name)
    return found


def lora_config(model: nn.Module, targets: str | list[str] | None = None, **kwargs: Any) -> LoraConfig:
    """A :class:`LoraConfig` for a transformers model: ``targets`` default to
    :func:`default_targets`; ``"all-linear"`` never reaches an output head; a sequence
    or token classification head (new weights) is trained fully via ``train_modules``.

    ``kwargs`` are other LoraConfig fields (``r``, ``alpha``, ``dropout``, ...), under
    lorakit's or PEFT's names (``lora_alpha``, ``target_modules``, ...); ``exclude`` and
    ``train_modules`` given there are kept and extended.

    Raises:
        ConfigError: a bad LoraConfig value or keyword; ``targets`` and ``target_modules`` both given.
    """
    kwargs = peft_names.rename("lorakit.hf.lora_config", kwargs)  # exclude/train_modules are extended here
    if "targets" in kwargs:  # PEFT's target_modules
        if targets is not None:
            raise peft_names.clash_error("lorakit.hf.lora_config", "target_modules")
        targets = kwargs.pop("targets")
    chosen = default_targets(model) if targets is None else ([targets] if isinstance(targets, str) else targets)
    heads = output_heads(model)
    # one string is one pattern, never its characters
    exclude = list(as_patterns("lorakit.hf.lora_config: exclude", kwargs.pop("exclude", None)))
    train = list(as_patterns("lorakit.hf.lora_config: train_modules", kwargs.pop("train_modules", None)))
    if ALL_LINEAR in chosen:
        exclude += [f"re:{h}(\\..*)?" for h in heads]
    arch = type(model).__name__
    if arch.endswith(("ForSequenceClassification", "ForTokenClassification", "ForImageClassification")):
        train += [h for h in heads if h in ("classifier", "score") and h not in train]
    return LoraConfig(targets=chosen, exclude=exclude, train_modules=train, **kwargs)
