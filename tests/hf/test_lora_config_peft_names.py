"""``lorakit.hf.lora_config`` under PEFT's names: it reads ``target_modules``, ``exclude_modules``
and ``modules_to_save`` itself (to extend them), so it maps them as LoraConfig does."""

from __future__ import annotations

import pytest
import transformers

import lorakit
import lorakit.hf
from lorakit import ConfigError


def _gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_peft_names_give_the_lorakit_config() -> None:
    model = _gpt2()
    peft = lorakit.hf.lora_config(model, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn"],
                                  exclude_modules=r".*\.h\.1\..*", modules_to_save=["ln_f"])  # fmt: skip
    ours = lorakit.hf.lora_config(model, ["c_attn"], r=4, alpha=8, dropout=0.1, exclude=[r"re:.*\.h\.1\..*"],
                                  train_modules=["ln_f"])  # fmt: skip
    assert peft == ours
    assert [n for n, _, _ in lorakit.select_targets(model, peft)] == ["transformer.h.0.attn.c_attn"]


def test_one_exclude_string_is_one_pattern() -> None:
    """It was split into its characters (list("h.0.attn.c_attn"))."""
    cfg = lorakit.hf.lora_config(_gpt2(), r=4, exclude="h.0.attn.c_attn", train_modules="ln_f")
    assert cfg.exclude == ("h.0.attn.c_attn",) and cfg.train_modules == ("ln_f",)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"targets": ["c_attn"], "target_modules": ["c_fc"]}, "targets= and target_modules= are one field"),
        ({"exclude": ["x"], "exclude_modules": ["y"]}, "exclude= and exclude_modules= are one field"),
        ({"train_modules": ["x"], "modules_to_save": ["y"]}, "train_modules= and modules_to_save= are one field"),
        ({"dora": True, "use_dora": True}, "dora= and use_dora= are one field"),
    ],
)
def test_clashes_and_refusals_are_config_errors(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"{needle}"):
        lorakit.hf.lora_config(_gpt2(), **kw)  # type: ignore[arg-type]
