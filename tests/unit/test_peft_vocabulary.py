"""LoraConfig under PEFT's field names: each alias, each clash, each refused option, and that a
config spelled in PEFT's words adapts and trains a model exactly as lorakit's spelling does."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig, peft_names

from .io_models import IDS, make_net

T = ["lin"]  # a target, for the cases about another field


@pytest.mark.parametrize(
    ("peft", "ours"),
    [
        ({"lora_alpha": 16}, {"alpha": 16}),
        ({"lora_dropout": 0.1}, {"dropout": 0.1}),
        ({"exclude_modules": ["gconv"]}, {"exclude": ["gconv"]}),
        # one string is PEFT's regex (full match), lorakit's "re:"; a list is names in both
        ({"exclude_modules": "g?conv"}, {"exclude": ["re:g?conv"]}),
        ({"modules_to_save": ["head"]}, {"train_modules": ["head"]}),
        ({"init_lora_weights": True}, {"init": "kaiming"}),
        ({"init_lora_weights": False}, {"init": "random"}),
        ({"init_lora_weights": "gaussian"}, {"init": "gaussian"}),
        ({"use_dora": True}, {"dora": True}),
        # accepted with nothing to do: the "off" value, a task without a head, the layer's own storage order
        ({"use_dora": False}, {}),
        ({"inference_mode": False}, {}),
        ({"task_type": "CAUSAL_LM"}, {}),
        ({"task_type": "SEQ_2_SEQ_LM"}, {}),
        ({"task_type": "FEATURE_EXTRACTION"}, {}),
        ({"fan_in_fan_out": True}, {}),
        ({"fan_in_fan_out": False}, {}),
        ({"lora_alpha": None, "lora_dropout": None}, {}),  # None is "not given", as dataclasses.replace passes it
    ],
)
def test_each_peft_name_equals_the_lorakit_spelling(peft: dict[str, Any], ours: dict[str, Any]) -> None:
    a, b = LoraConfig(r=4, targets=T, **peft), LoraConfig(r=4, targets=T, **ours)
    assert a == b and a.to_dict() == b.to_dict() and repr(a) == repr(b)


@pytest.mark.parametrize(
    ("value", "targets"),
    [(["q_proj", "v_proj"], ("q_proj", "v_proj")), ("lin|conv", ("re:lin|conv",)), ("all-linear", ("all-linear",))],
)
def test_target_modules(value: object, targets: tuple[str, ...]) -> None:
    assert LoraConfig(target_modules=value).targets == targets  # type: ignore[arg-type]


def test_the_issue_example_and_the_same_names() -> None:
    peft_cfg = LoraConfig(lora_alpha=16, target_modules=["q_proj"], r=8)
    assert peft_cfg == LoraConfig(alpha=16, targets=["q_proj"], r=8)
    # r, rank_pattern, alpha_pattern, use_rslora and bias are the same names with the same meaning
    same = dict(r=8, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2.0}, use_rslora=True, bias="lora_only")
    a = LoraConfig(lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], **same)  # type: ignore[arg-type]
    b = LoraConfig(alpha=16, dropout=0.05, targets=["q_proj", "v_proj"], **same)  # type: ignore[arg-type]
    assert a == b
    # PEFT's names are not stored: to_dict writes lorakit's, and it reads back equal
    assert LoraConfig.from_dict(a.to_dict()) == a and "lora_alpha" not in a.to_dict()
    assert LoraConfig.from_dict({"lora_alpha": 16, "target_modules": ["q_proj"], "r": 8}) == peft_cfg
    assert pickle.loads(pickle.dumps(a)) == a
    assert dataclasses.replace(peft_cfg, alpha=4) == LoraConfig(alpha=4, targets=["q_proj"], r=8)


@pytest.mark.parametrize(("peft", "ours"), sorted(peft_names.RENAMED.items()))
def test_a_field_under_both_names_is_refused_naming_both(peft: str, ours: str) -> None:
    values = {"lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["lin"], "exclude_modules": ["conv"],
              "modules_to_save": ["head"], "init_lora_weights": True, "use_dora": True}  # fmt: skip
    ours_values = {"alpha": 8, "dropout": 0.1, "targets": ["lin"], "exclude": ["conv"], "train_modules": ["head"],
                   "init": "kaiming", "dora": True}  # fmt: skip
    kw = {"targets": T, peft: values[peft], ours: ours_values[ours]}  # the same value: still one field twice
    with pytest.raises(ConfigError, match=rf"{ours}= and {peft}= are one field"):
        LoraConfig(**kw)


def test_a_positional_field_and_its_peft_name_clash() -> None:
    with pytest.raises(ConfigError, match="alpha= and lora_alpha="):
        LoraConfig(8, 16, lora_alpha=16, targets=T)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"init_lora_weights": "pissa_niter_four"}, r"init_lora_weights='pissa_niter_four' is not implemented"),
        ({"init_lora_weights": "eva"}, r"init_lora_weights='eva' is not implemented in lorakit; use True"),
        ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'"),
        ({"init_lora_weights": "corda"}, r"init_lora_weights='corda'"),
        ({"init_lora_weights": "orthogonal"}, r"init_lora_weights='orthogonal'"),
        ({"init_lora_weights": "mica"}, r"init_lora_weights='mica'"),
        ({"init_lora_weights": 1}, r"init_lora_weights=1 "),
        ({"task_type": "SEQ_CLS"}, r"task_type='SEQ_CLS'.*classifier/score head.*train_modules"),
        ({"task_type": "TOKEN_CLS"}, r"task_type='TOKEN_CLS'"),
        ({"task_type": "QUESTION_ANS"}, r"task_type='QUESTION_ANS'.*qa_outputs"),
        ({"task_type": "CAUSAL"}, r"task_type must be one of .*got 'CAUSAL'"),
        ({"inference_mode": True}, r"inference_mode=True"),
        ({"fan_in_fan_out": "yes"}, r"fan_in_fan_out must be True or False, got 'yes'"),
        ({"use_dora": "no"}, r"LoraConfig.use_dora must be a bool, got 'no'"),
        ({"dora": True, "use_dora": True}, r"dora= and use_dora= are one field"),
    ],
)
def test_peft_values_lorakit_does_not_implement_are_refused_naming_them(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        LoraConfig(targets=T, **kw)


@pytest.mark.parametrize("name", sorted(peft_names.UNSUPPORTED))
def test_peft_features_lorakit_does_not_implement_are_refused_naming_them(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"PEFT's {name} \(.+\) is not implemented in lorakit"):
        LoraConfig(targets=T, **{name: [0]})


@pytest.mark.parametrize("name", ["loftq_config", "eva_config", "layers_pattern", "peft_type", "megatron_core",
                                  "base_model_name_or_path", "runtime_config", "ensure_weight_tying"])  # fmt: skip
def test_peft_fields_without_a_lorakit_counterpart_are_refused_naming_them(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"PEFT's {name} has no lorakit counterpart"):
        LoraConfig(targets=T, **{name: None})


def test_every_field_of_peft_loraconfig_is_mapped_or_refused_by_name() -> None:
    """The table covers the installed PEFT; none of its fields gets a bare TypeError or passes unseen."""
    peft = pytest.importorskip("peft")
    for f in dataclasses.fields(peft.LoraConfig):
        assert f.name in peft_names.PEFT_FIELDS, f"PEFT's {f.name} is missing from lorakit.peft_names"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw = {f.name: default} if f.name != "target_modules" else {}
        try:
            LoraConfig(**({"targets": T} if f.name not in peft_names.RENAMED else {"target_modules": T}), **kw)
        except ConfigError as exc:
            assert f.name in str(exc)
        else:
            assert f.name in {*peft_names.RENAMED, *peft_names.SAME, "use_dora", "task_type", "inference_mode",
                              "fan_in_fan_out"}  # fmt: skip


@pytest.mark.parametrize(("typo", "hint"), [("lora_alpah", "lora_alpha"), ("targetss", "targets"),
                                            ("target_module", "target_modules")])  # fmt: skip
def test_a_misspelt_keyword_gets_the_did_you_mean_hint(typo: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown keyword '{typo}'; did you mean .*'{hint}'"):
        LoraConfig(**{typo: 1})


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"lora_alpha": -1}, r"LoraConfig\.lora_alpha must be a finite number > 0, got -1"),
        ({"lora_dropout": 1.0}, r"LoraConfig\.lora_dropout must be in \[0, 1\), got 1.0"),
        ({"modules_to_save": [3]}, r"LoraConfig\.modules_to_save: expected path patterns"),
        ({"exclude_modules": [""]}, r"LoraConfig\.exclude_modules: patterns must be non-empty"),
    ],
)
def test_an_invalid_value_is_named_by_the_keyword_written(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        LoraConfig(targets=T, **kw)


def test_an_invalid_target_modules_value_names_target_modules() -> None:
    with pytest.raises(ConfigError, match=r"LoraConfig\.target_modules: expected path patterns"):
        LoraConfig(target_modules=[3])  # type: ignore[list-item]


def _run(config: LoraConfig, tmp: Path) -> tuple[dict[str, torch.Tensor], bytes, list[float]]:
    """Inject ``config`` into the test Net, train 3 AdamW steps, save: trained state, config file, losses."""
    model = make_net().train()
    torch.manual_seed(7)
    lorakit.inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(IDS).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    lorakit.save_adapter(model, tmp)
    return {k: v.clone() for k, v in model.state_dict().items()}, (tmp / "adapter_config.json").read_bytes(), losses


def test_a_config_in_peft_names_injects_and_trains_exactly_as_lorakit_names(tmp_path: Path) -> None:
    same = dict(r=4, rank_pattern={"conv": 2}, bias="lora_only")
    peft_cfg = LoraConfig(lora_alpha=6, lora_dropout=0.1, target_modules=["emb", "conv", "gconv", "lin"],
                          modules_to_save=["head"], init_lora_weights=False, use_dora=False, **same)  # type: ignore[arg-type]  # fmt: skip
    ours = LoraConfig(alpha=6, dropout=0.1, targets=["emb", "conv", "gconv", "lin"], train_modules=["head"],
                      init="random", **same)  # type: ignore[arg-type]  # fmt: skip
    a, a_file, a_losses = _run(peft_cfg, tmp_path / "a")
    b, b_file, b_losses = _run(ours, tmp_path / "b")
    # same seed, same config, same maths: bitwise equal states, files and losses
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a_file == b_file and a_losses == b_losses
    assert a_losses[-1] < a_losses[0]  # and it did train


def test_saved_files_carry_peft_init_value(tmp_path: Path) -> None:
    """adapter_config.json writes the init through the one table: "gaussian" stays "gaussian" (was True)."""
    for init, written in (("kaiming", True), ("gaussian", "gaussian"), ("random", False)):
        model = make_net()
        lorakit.inject(model, LoraConfig(r=2, targets=["lin"], init=init))
        lorakit.save_adapter(model, tmp_path / init)
        assert json.loads((tmp_path / init / "adapter_config.json").read_text())["init_lora_weights"] == written
