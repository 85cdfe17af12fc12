"""``lorakit hf compare`` / ``lorakit.hf.compare``: every strategy on the same data and budget.

One comparison on the tiny LLaMA folder (conftest.tiny_models), 1 epoch of 5 steps, is
shared by the module; it runs after a comparison of two of its strategies in the same
folder, so it resumes: those two are kept, the rest run. The trainable-parameter and byte
columns are checked against counts made here from the model's own layers and from the
files. The plain strategies' parts on a tied GPT-2 and on a BERT classifier are checked
on the models themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import transformers
from torch import nn

from lorakit.cli import main
from lorakit.errors import ConfigError

from .models import bert, gpt2
from .runs import causal_data, write_jsonl

SETTINGS: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 4,
    "max_len": 32,
    "lr": 1e-2,
    "plain_lr": 1e-3,
    "device": "cpu",
    "dropout": 0.0,
}
DEFAULT = ["full", "partial", "head", "lora-r4", "lora-r8", "lora-r16", "dora", "loraplus"]
# Each method once (lora-r8 and lora-r16 are lora-r4's code at another rank).
RUN = ["full", "partial", "head", "lora-r4", "dora", "loraplus"]
FIRST = ["full", "lora-r4"]  # the earlier, "interrupted" comparison: these finished, the rest did not
COLUMNS = ["strategy", "method", "eval_loss", "perplexity", "accuracy", "trainable", "trainable_fraction",
           "total_params", "stored", "stored_bytes", "epoch_s", "train_s", "steps", "peak_mem_mib", "memory",
           "wall_s", "base_eval_loss_adapted", "base_perplexity_adapted", "base_accuracy_adapted"]  # fmt: skip
LORA_ONLY = ["adapted_layers", "base_eval_loss_off", "base_perplexity_off", "base_accuracy_off"]
DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_data(path: Path) -> Path:
    """The base's "own" text: colours, none of the new task's counting."""
    things = {"sky": "blue", "grass": "green", "snow": "white"}
    return write_jsonl(path, [{"prompt": f"the color of {k} is", "response": v} for k, v in things.items()])


@pytest.fixture(scope="module")
def run(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from lorakit.hf import compare

    root = tmp_path_factory.mktemp("hfcompare")
    ns = SimpleNamespace(root=root, model=tiny_models["llama"], data=causal_data(root / "d.jsonl"),
                         base=base_data(root / "base.jsonl"), out=root / "cmp")  # fmt: skip
    first = compare(ns.model, ns.data, base_data=ns.base, strategies=FIRST, out=ns.out, stream=io.StringIO(),
                    **SETTINGS)  # fmt: skip
    ns.first = first
    ns.first_files = {s: (ns.out / "results" / f"{s}.json").read_bytes() for s in FIRST}
    progress = io.StringIO()
    ns.result = compare(ns.model, ns.data, base_data=ns.base, strategies=RUN, out=ns.out, stream=progress,
                        **SETTINGS)  # fmt: skip
    ns.progress = progress.getvalue()
    return ns


def test_the_default_set_is_every_method_at_three_ranks() -> None:
    from lorakit.hf.comparison_job import CATALOGUE

    assert list(CATALOGUE.default) == DEFAULT


def test_every_strategy_runs_and_reports_every_column(run: SimpleNamespace) -> None:
    rows = run.result.rows
    assert [r["strategy"] for r in rows] == RUN
    for r in rows:
        lora = r["strategy"] not in ("full", "partial", "head")
        for key in COLUMNS + (LORA_ONLY if lora else []):
            assert r.get(key) is not None, (r["strategy"], key)
        if not lora:  # no adapter to switch off
            assert r["base_eval_loss_off"] is None and r["adapted_layers"] is None
        assert r["memory"] == "peak RSS" and r["peak_mem_mib"] > 0 and r["epoch_s"] > 0 and r["steps"] == 5
        assert r["perplexity"] == pytest.approx(2.718281828459045 ** r["eval_loss"], rel=1e-12)
        assert 0 <= r["accuracy"] <= 1
    # the files: JSON with the same rows, the Markdown table with a line per strategy, the plot
    saved = json.loads((run.out / "results.json").read_text())
    assert saved["rows"] == rows and saved["base"]["base_eval_loss"] is not None
    md = (run.out / "results.md").read_text()
    assert md == run.result.markdown
    assert all(f"| {s} |" in md for s in RUN) and "base eval loss, adapter off" in md and "token accuracy" in md
    assert (run.out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a progress line as each strategy starts and ends, with an ETA once one has ended
    for i, s in enumerate(RUN, 1):
        if s not in FIRST:
            assert f"[{i}/6] {s}: running" in run.progress and f"[{i}/6] {s}: done in" in run.progress
    assert re.search(r"\[2/6\] partial: running \(ETA \d", run.progress)  # from the kept strategy's time


def test_training_moved_the_new_task_and_the_adapter_off_is_the_base(run: SimpleNamespace) -> None:
    base = run.result.base
    for r in run.result.rows:
        assert r["eval_loss"] < base["base_model_eval_loss"], r["strategy"]  # lr 1e-2/1e-3 on 5 steps: it learns
        if r["adapted_layers"] is not None:  # the adapter off is the base, to the bit: same model, same data
            assert r["base_eval_loss_off"] == base["base_eval_loss"], r["strategy"]
            assert r["base_accuracy_off"] == base["base_accuracy"], r["strategy"]


def test_verdicts_are_computed_from_the_numbers(run: SimpleNamespace) -> None:
    rows = run.result.rows
    fewest = min(rows, key=lambda r: r["trainable"])
    smallest = min(rows, key=lambda r: r["stored_bytes"])
    lowest = min(rows, key=lambda r: r["eval_loss"])
    said = "\n".join(run.result.verdicts)
    assert f"Fewest trainable parameters: {fewest['strategy']} ({fewest['trainable']:,})" in said
    assert f"Smallest per task (bytes stored): {smallest['strategy']}" in said
    assert f"Lowest eval loss: {lowest['strategy']} ({lowest['eval_loss']:.4f})" in said
    assert "Least forgetting" in said
    for name in run.result.pareto:  # nobody both as good (eval loss) and smaller
        r = next(x for x in rows if x["strategy"] == name)
        assert not any(
            o["eval_loss"] <= r["eval_loss"] and o["stored_bytes"] < r["stored_bytes"] for o in rows if o is not r
        )


def _llama(run: SimpleNamespace) -> nn.Module:
    model: nn.Module = transformers.AutoModelForCausalLM.from_pretrained(run.model)
    return model


def _lora(model: nn.Module, r: int, dora: bool) -> tuple[int, int]:
    """(trainable, adapted layers) of hf train's LLaMA targets: r (in + out) per projection, DoRA + out."""
    trainable = adapted = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in DECODER:
            adapted += 1
            trainable += r * (m.in_features + m.out_features) + (m.out_features if dora else 0)
    return trainable, adapted


def _partial_names(model: nn.Module) -> set[str]:
    """LLaMA's 2 blocks: the second, the final norm and lm_head train."""
    return {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm.", "lm_head."))}


def test_trainable_parameters_equal_the_formula(run: SimpleNamespace) -> None:
    model = _llama(run)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    rows = {r["strategy"]: r for r in run.result.rows}
    assert rows["full"]["trainable"] == total == rows["full"]["total_params"]
    assert rows["head"]["trainable"] == params["lm_head.weight"].numel()  # the tiny LLaMA's head is not tied
    assert rows["partial"]["trainable"] == sum(params[n].numel() for n in _partial_names(model))
    for name, r, dora in (("lora-r4", 4, False), ("dora", 16, True), ("loraplus", 16, False)):
        assert (rows[name]["trainable"], rows[name]["adapted_layers"]) == _lora(model, r, dora), name
    for row in rows.values():
        assert row["trainable_fraction"] == row["trainable"] / total


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_bytes_stored_are_the_trained_parameters_in_fp32(run: SimpleNamespace) -> None:
    model = _llama(run)
    rows = {r["strategy"]: r for r in run.result.rows}
    expected = {"full": {n for n, _ in model.named_parameters()}, "partial": _partial_names(model),
                "head": {"lm_head.weight"}}  # fmt: skip
    for name, keys in expected.items():
        tensors = safetensors.torch.load((run.out / rows[name]["stored"]).read_bytes())
        assert set(tensors) == keys, name
        assert sum(4 * t.numel() for t in tensors.values()) == 4 * rows[name]["trainable"], name
    for name in ("lora-r4", "dora", "loraplus"):
        assert rows[name]["stored"] == f"train/{name}/adapter"
        tensors = safetensors.torch.load((run.out / rows[name]["stored"] / "adapter_model.safetensors").read_bytes())
        assert sum(t.numel() for t in tensors.values()) == rows[name]["trainable"], name
    for r in rows.values():  # the whole file or folder, header and JSON included
        assert r["stored_bytes"] == _size(run.out / r["stored"]) > 0, r["strategy"]


def test_an_interrupted_comparison_resumes_with_only_the_missing_strategies(run: SimpleNamespace) -> None:
    for i, s in enumerate(RUN, 1):
        kept = s in FIRST
        assert (f"[{i}/6] {s}: kept from an earlier run" in run.progress) == kept
        assert (f"[{i}/6] {s}: running" in run.progress) != kept
    # the strategies already done: not run again, the same numbers in the new table
    assert {s: (run.out / "results" / f"{s}.json").read_bytes() for s in FIRST} == run.first_files
    old = {r["strategy"]: r for r in run.first.rows}
    assert all(r == old[r["strategy"]] for r in run.result.rows if r["strategy"] in FIRST)


def test_the_command_prints_the_same_table_from_the_kept_results(run: SimpleNamespace) -> None:
    before = {p.name: p.read_bytes() for p in (run.out / "results").iterdir()}
    code, out, err = _cli(run.model, run.data, run.out, f"base_data={run.base}", f"strategies={','.join(RUN)}")
    assert code == 0, err[-3000:]
    assert all(f"{s}: kept from an earlier run" in out for s in RUN) and run.result.markdown in out
    assert {p.name: p.read_bytes() for p in (run.out / "results").iterdir()} == before


def test_a_folder_with_other_settings_is_refused_before_any_work(run: SimpleNamespace) -> None:
    from lorakit.hf import compare

    before = {p.name: p.read_bytes() for p in (run.out / "results").iterdir()}
    with pytest.raises(ConfigError, match=r"settings\.json.*epochs: 1 there, 2 now"):
        compare(run.model, run.data, base_data=run.base, out=run.out, **{**SETTINGS, "epochs": 2})
    assert {p.name: p.read_bytes() for p in (run.out / "results").iterdir()} == before


def _cli(model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    argv = ["hf", "compare", f"model={model}", f"data={data}", f"out={out}"]
    argv += [*(f"{k}={v}" for k, v in SETTINGS.items()), *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


BAD = [  # (argument, strings the one-line error must contain)
    ("strategies=full,lora-8", ["unknown strategy 'lora-8'", "did you mean 'lora-r8'"]),
    ("strategies=fulll", ["unknown strategy 'fulll'", "did you mean 'full'"]),
    ("strategies=dor", ["unknown strategy 'dor'", "did you mean 'dora'"]),
    ("strategies=lora-r0", ["unknown strategy 'lora-r0'", "rank >= 1"]),
    ("r=16", ["r=", "strategies=lora-r4"]),
    ("epoch=3", ["'epoch'", "did you mean 'epochs'"]),
    ("lr=-1", ["lr must be a finite number > 0", "-1"]),
    ("plain_lr=0", ["plain_lr must be a finite number > 0", "0"]),
    ("base_data=nowhere.jsonl", ["nowhere.jsonl", "no such data file"]),
    ("eval_fraction=0", ["no eval records"]),
]


@pytest.mark.parametrize(("arg", "needles"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_before_any_work(
    tiny_models: dict[str, Path], tmp_path: Path, arg: str, needles: list[str]
) -> None:
    data = causal_data(tmp_path / "d.jsonl")
    code, _, err = _cli(tiny_models["llama"], data, tmp_path / "never", arg)
    lines = [line for line in err.splitlines() if line.startswith("lorakit hf: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert all(n in lines[0] for n in needles), (lines[0], needles)
    assert not (tmp_path / "never").exists()


def test_a_bad_strategy_name_from_python_is_a_config_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from lorakit.hf import compare

    with pytest.raises(ConfigError, match=r"unknown strategy 'lora-rank8'; did you mean"):
        compare(tiny_models["llama"], causal_data(tmp_path / "d.jsonl"), strategies=["lora-rank8"],
                out=tmp_path / "never")  # fmt: skip
    assert not (tmp_path / "never").exists()


def _trained(model: nn.Module, strategy: str) -> tuple[list[str], int]:
    from lorakit.hf.comparison_job import plain_trainable

    names = plain_trainable(model, strategy)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    return names, sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_tied_head_is_the_input_embedding_trained_and_counted_once() -> None:
    from lorakit.hf.comparison_job import describe

    model = gpt2()
    wte = model.get_submodule("transformer.wte").weight
    assert model.get_submodule("lm_head").weight is wte
    names, count = _trained(model, "head")
    assert names == ["transformer.wte.weight"] and count == wte.numel()
    assert "tied to the input embeddings" in describe(model, "head")
    names, count = _trained(gpt2(), "partial")  # the second of 2 blocks, ln_f, and the tied head
    params = dict(gpt2().named_parameters())
    want = ["transformer.wte.weight"] + [n for n in params if n.startswith(("transformer.h.1.", "transformer.ln_f."))]
    assert names == want and count == sum(params[n].numel() for n in want)


def test_an_encoder_classifier_trains_its_classifier_and_later_layers() -> None:
    from lorakit.hf.comparison_job import describe

    model = bert()
    names, _ = _trained(model, "head")
    assert names == ["classifier.weight", "classifier.bias"] and "tied" not in describe(model, "head")
    names, _ = _trained(bert(), "partial")
    assert names == [n for n, _ in bert().named_parameters()
                     if n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))]  # fmt: skip
    assert "bert.encoder.layer[1:] (1 of 2 blocks)" in describe(bert(), "partial")
