"""LoraConfig validation and target selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig, TargetError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.k_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.my_q_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv2d(4, 8, 3, groups=4)
        self.lm_head = nn.Linear(8, 30)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.layers:
            h = b.norm(h + b.v_proj(b.q_proj(h)))
        return self.lm_head(h)


def _targets(config: LoraConfig) -> list[str]:
    return [name for name, _, _ in lorakit.select_targets(TinyLM(), config)]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("r", 0, "r must be an int > 0, got 0"),
        ("r", -3, "got -3"),
        ("r", 2.5, "got 2.5"),
        ("r", True, "got True"),
        ("alpha", 0, "alpha must be a finite number > 0, got 0"),
        ("alpha", -1.0, "got -1.0"),
        ("alpha", float("nan"), "got nan"),
        ("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
        ("dropout", -0.1, "got -0.1"),
        ("init", "xavier", "init must be one of"),
        ("bias", "some", "bias must be one of"),
        ("batchnorm", "train", "batchnorm must be one of"),
        ("targets", ["re:(unclosed"], "does not compile"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be an int > 0, got 0"),
        ("alpha_pattern", {"q_proj": -2}, "alpha_pattern['q_proj']"),
        ("target_types", [3], "target_types"),
    ],
)
def test_bad_values_name_field_and_value(field: str, value: object, needle: str) -> None:
    kwargs = {"targets": ["q_proj"], field: value}
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_config_needs_some_target_and_normalises_lists() -> None:
    with pytest.raises(ConfigError, match="nothing to target"):
        LoraConfig()
    assert LoraConfig(targets=["a", "b"]) == LoraConfig(targets=("a", "b"))
    assert LoraConfig(targets="q_proj").targets == ("q_proj",)


def test_from_dict_rejects_unknown_keys_and_round_trips() -> None:
    cfg = LoraConfig(r=4, alpha=16, targets=["q_proj"], rank_pattern={"v_proj": 2}, target_types=[nn.Conv2d])
    again = LoraConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match=r"my.json: unknown LoraConfig keys \['lora_rank'\]"):
        LoraConfig.from_dict({"targets": ["q"], "lora_rank": 4}, source="my.json")


def test_scaling_rank_and_alpha_patterns() -> None:
    cfg = LoraConfig(r=8, alpha=16, targets=["q_proj"], rank_pattern={"layers.1.*": 4}, alpha_pattern={"v_proj": 2})
    assert cfg.scaling_for("layers.0.q_proj") == 2.0
    assert cfg.rank_for("layers.1.q_proj") == 4 and cfg.scaling_for("layers.1.q_proj") == 4.0
    assert cfg.scaling_for("layers.0.v_proj") == 2 / 8
    rs = LoraConfig(r=16, alpha=8, targets=["q_proj"], use_rslora=True)
    assert math.isclose(rs.scaling_for("x.q_proj"), 8 / 4)
    assert LoraConfig(r=4, targets=["q"]).scaling_for("q") == 1.0  # alpha defaults to r


def test_name_patterns() -> None:
    assert _targets(LoraConfig(targets=["q_proj"])) == ["layers.0.q_proj", "layers.1.q_proj"]  # not my_q_proj
    assert _targets(LoraConfig(targets=["layers.1.v_proj"])) == ["layers.1.v_proj"]
    assert _targets(LoraConfig(targets=["layers.*.k_proj"])) == ["layers.0.k_proj", "layers.1.k_proj"]
    assert _targets(LoraConfig(targets=["*_proj"], exclude=["my_q_proj", "k_proj"])) == [
        "layers.0.q_proj",
        "layers.0.v_proj",
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]
    assert _targets(LoraConfig(targets=[r"re:layers\.0\.(q|v)_proj"])) == ["layers.0.q_proj", "layers.0.v_proj"]
    # wildcards skip layers without a handler (LayerNorm, Block) instead of failing
    assert "layers.0.norm" not in _targets(LoraConfig(targets=["layers.0.*"]))


def test_pattern_set_matches_as_match_pattern() -> None:
    """``PatternSet`` (suffix lookup, used by inject) agrees with ``match_pattern`` pair by pair,
    order included, on near misses: partial words, dot boundaries, globs and regexes."""
    from lorakit.config import PatternSet, match_pattern

    patterns = [
        "q_proj", "layers.1.q_proj", "1.q_proj", "ayers.1.q_proj", "model.layers", "*.v_proj",
        "layers.?.k_proj", r"re:.*\.(q|v)_proj", "re:layers", "my_q_proj", "q_proj", "model.layers.0.q_proj",
    ]  # fmt: skip
    names = [
        "", "q_proj", "my_q_proj", "layers.1.q_proj", "model.layers.1.q_proj", "model.layers.11.q_proj",
        "model.layers.0.k_proj", "model.layers.0.v_proj", "model.layers", "xmodel.layers", "layers", "a.b.my_q_proj",
    ]  # fmt: skip
    matcher = PatternSet(patterns)
    for name in names:
        expected = list(dict.fromkeys(p for p in patterns if match_pattern(p, name)))
        assert matcher.matching(name) == expected, name
        assert matcher.matches(name) == bool(expected), name
    for pattern in patterns:  # one pattern at a time: plain only, wildcard only
        one = PatternSet([pattern])
        assert [n for n in names if one.matches(n)] == [n for n in names if match_pattern(pattern, n)], pattern


def test_train_paths_are_the_outermost_matches() -> None:
    """A trained module's children travel inside its copy: only the outermost match is a path."""
    from lorakit.owned import train_paths

    model = nn.Sequential(
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2))
    )
    assert train_paths(model, ["0", "0.1", "2.0"]) == ["0", "2.0"]
    assert train_paths(model, ["re:\\d", "2"]) == ["0", "1", "2"]
    assert train_paths(model, ["1", "0.0"]) == ["0.0", "0.1", "1"]  # "1" is a suffix of "0.1" too
    assert train_paths(model, ["missing"]) == []


def test_all_linear_skips_output_head_and_types_select() -> None:
    names = _targets(LoraConfig(targets="all-linear"))
    assert "lm_head" not in names and len(names) == 8
    assert _targets(LoraConfig(target_types=["Embedding"])) == ["embed"]
    assert _targets(LoraConfig(target_types=[nn.Conv2d], r=4)) == ["conv"]


def test_nothing_matched_lists_closest_names() -> None:
    with pytest.raises(TargetError) as err:
        lorakit.inject(TinyLM(), LoraConfig(targets=["q_prj"]))
    msg = str(err.value)
    assert "no layer matched" in msg and "q_proj" in msg and "did you mean" in msg
    assert "Adaptable layers" in msg and "lm_head (Linear)" in msg


def test_explicit_target_without_handler_is_an_error() -> None:
    with pytest.raises(TargetError, match=r"layers.0.norm: selected by targets entry 'norm'.*LayerNorm"):
        lorakit.inject(TinyLM(), LoraConfig(targets=["norm"]))
    with pytest.raises(TargetError, match="LayerNorm has no LoRA handler"):
        lorakit.inject(TinyLM(), LoraConfig(target_types=["LayerNorm"]))


def test_rank_groups_mismatch_names_module_and_changes_nothing() -> None:
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        TargetError, match=r"conv: Conv2d\(4, 8, groups=4\) needs r to be a multiple of groups=4, got r=6"
    ):
        lorakit.inject(model, LoraConfig(r=6, targets=["q_proj", "conv"]))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    report = lorakit.inject(model, LoraConfig(r=6, targets=["q_proj", "conv"], rank_pattern={"conv": 8}))
    assert {t.name: t.r for t in report.targets}["conv"] == 8


def test_adapter_names_checked() -> None:
    model = TinyLM()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "task-1")
    with pytest.raises(ConfigError, match="already exists"):
        lorakit.inject(model, LoraConfig(targets=["v_proj"]), "task-1")
    for bad in ["", "a.b", "has space", "training"]:
        with pytest.raises(ConfigError, match="adapter name"):
            lorakit.inject(model, LoraConfig(targets=["q_proj"]), bad)
    with pytest.raises(
        lorakit.AdapterNotFoundError, match=r"unknown adapter\(s\) \['nope'\]; the model has \['task-1'\]"
    ):
        lorakit.set_adapter(model, "nope")


def test_requires_grad_follows_active_adapters_train_modules_and_bias() -> None:
    model = TinyLM()
    lorakit.inject(model, LoraConfig(targets=["q_proj"], train_modules=["lm_head"], bias="lora_only"), "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "layers.0.q_proj.lora.a.A",
        "layers.0.q_proj.lora.a.B",
        "layers.1.q_proj.lora.a.A",
        "layers.1.q_proj.lora.a.B",
        "layers.0.q_proj.bias",
        "layers.1.q_proj.bias",
        "lm_head.weight",
        "lm_head.bias",
    }
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "b", activate=False)
    assert lorakit.active_adapters(model) == ("a",)
    assert not model.layers[0].q_proj.lora["b"].A.requires_grad
    lorakit.set_adapter(model, "b")
    assert model.layers[0].q_proj.lora["b"].A.requires_grad
    assert not model.layers[0].q_proj.lora["a"].A.requires_grad
    with pytest.raises(TargetError, match=r"train_modules \['classifier'\] matched no module"):
        lorakit.inject(model, LoraConfig(targets=["v_proj"], train_modules=["classifier"]), "c")
    assert "c" not in lorakit.list_adapters(model)


def test_report_text() -> None:
    report = lorakit.inject(TinyLM(), LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    text = str(report)
    assert "layers.0.q_proj" in text and "Linear" in text
    assert report.trainable == 4 * 2 * (8 + 8)
    assert f"{report.trainable:,}" in report.summary()
    assert math.isclose(report.reduction, report.total / report.trainable)


def test_roberta_base_query_value_r8_is_the_lora_papers_03m() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(), add_pooling_layer=False)  # roberta-base shape
    report = lorakit.inject(model, LoraConfig(r=8, targets=["query", "value"]))
    assert len(report.targets) == 24
    assert report.trainable == 294_912


@pytest.mark.parametrize("how", ["delete", "unload", "merge_and_unload"])
def test_removing_the_last_adapter_restores_requires_grad(how: str) -> None:
    model = TinyLM()
    model.layers[1].norm.weight.requires_grad_(False)  # frozen by the user: must stay frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "a")
    lorakit.inject(model, LoraConfig(targets=["v_proj"]), "b")
    assert not model.embed.weight.requires_grad
    if how == "delete":
        lorakit.delete_adapter(model, "a")
        assert not model.embed.weight.requires_grad  # "b" is still there: the base stays frozen
        lorakit.delete_adapter(model, "b")
    else:
        getattr(lorakit, how)(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "lorakit_requires_grad")
