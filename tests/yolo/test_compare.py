"""``lorakit yolo compare`` / ``lorakit.yolo.compare``: every strategy on the same data and budget.

One comparison of every method (1 epoch, imgsz 64, 4 images per split) on a random-weight
2-class yolo26n base, adapted to the 3-class synthetic domain B with domain A as ``base_data``,
is shared by the module; the last test resumes it with plain LoRA added (``lora-r2``). Each
strategy runs in a child interpreter, where ``child_network_guard`` refuses the network. The
trainable-parameter column is checked against a count made here from the model's layers, the
byte column against the files. With random weights and one epoch every mAP is 0, so accuracy
is checked for presence, not size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from torch import nn
from yolo_helpers import child_network_guard, save_random_detector

from lorakit.cli import main
from lorakit.errors import ConfigError

pytestmark = pytest.mark.slow
IMGSZ = 64
TRAIN: dict[str, Any] = {
    "batch": 4,
    "nbs": 4,
    "warmup_epochs": 0,
    "workers": 0,
    "plots": False,
    "device": "cpu",
    "val": False,
    "seed": 0,
}
DEFAULT = ["full", "partial", "head", "lora-r4", "lora-r8", "lora-r16", "dora", "loraplus"]
# The module trains each method once, as every child process costs 15-40 s here (the default set
# itself is pinned below): lora-r4/r8/r16 are one code path at three ranks, and plain LoRA is trained
# by the resume test, as lora-r2 (its row gets every check the shared run's rows get).
RUN = ["full", "partial", "head", "dora", "loraplus"]
RESUMED = "lora-r2"
COLUMNS = [
    "strategy",
    "method",
    "map50_95",
    "map50",
    "trainable",
    "trainable_fraction",
    "total_params",
    "stored",
    "stored_bytes",
    "epoch_s",
    "train_s",
    "peak_mem_mib",
    "memory",
    "wall_s",
    "base_map50_95_adapted",
    "base_map50_adapted",
]
LORA_ONLY = ["adapted_layers", "base_map50_95_off", "base_map50_off"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The base (random weights, domain A's 2 classes), domain B as the new data, domain A as base_data."""
    from lorakit.yolo import make_dataset

    root = tmp_path_factory.mktemp("compare")
    base = save_random_detector(root / "base.pt", seed=0, nc=2)
    a = make_dataset(root / "A", domain="A", n_train=4, n_val=2, imgsz=IMGSZ, seed=0)
    b = make_dataset(root / "B", domain="B", n_train=4, n_val=2, imgsz=IMGSZ, seed=1)
    guard, log = child_network_guard(root)
    return SimpleNamespace(root=root, base=base, a=Path(a), b=Path(b), out=root / "cmp", guard=guard, network=log)


@pytest.fixture(scope="module")
def run(inputs: SimpleNamespace) -> SimpleNamespace:
    from lorakit.yolo import compare

    root, base, a, b, guard = inputs.root, inputs.base, inputs.a, inputs.b, inputs.guard
    progress = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in guard.items():
            mp.setenv(k, v)
        mp.setenv("OMP_NUM_THREADS", "1")
        result = compare(
            base, b, strategies=RUN, epochs=1, imgsz=IMGSZ, base_data=a, out=root / "cmp", stream=progress, **TRAIN
        )
    return SimpleNamespace(**vars(inputs), result=result, progress=progress.getvalue())


def test_the_default_set_is_every_method_at_three_ranks() -> None:
    from lorakit.yolo.comparison_job import CATALOGUE

    assert list(CATALOGUE.default) == DEFAULT


def _check_columns(r: dict[str, Any]) -> None:
    """Every column of the table is filled in (the LoRA family's too), with a measured memory and epoch time."""
    lora = r["strategy"] not in ("full", "partial", "head")
    for key in COLUMNS + (LORA_ONLY if lora else []):
        assert r.get(key) is not None, (r["strategy"], key)
    if not lora:  # no adapter to switch off: the fine-tuned model is measured on the base data
        assert r["base_map50_95_off"] is None and r["adapted_layers"] is None
    assert r["memory"] == "peak RSS" and r["peak_mem_mib"] > 0 and r["epoch_s"] > 0


def test_every_strategy_runs_and_reports_every_column(run: SimpleNamespace) -> None:
    assert not run.network.exists() or run.network.read_text() == ""
    rows = run.result.rows
    assert [r["strategy"] for r in rows] == RUN
    for r in rows:
        _check_columns(r)
    # the files: JSON with the same rows, the Markdown table with a line per strategy, the plot
    saved = json.loads((run.out / "results.json").read_text())
    assert saved["rows"] == rows and saved["base"]["base_map50_95"] is not None
    md = (run.out / "results.md").read_text()
    assert md == run.result.markdown
    assert all(f"| {s} |" in md for s in RUN) and "base mAP50-95, adapter off" in md
    assert (run.out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for s in RUN:
        assert (run.out / "results" / f"{s}.json").is_file()
    # a progress line as each strategy starts and ends, with an ETA once one has ended
    for i, s in enumerate(RUN, 1):
        assert f"[{i}/5] {s}: running" in run.progress and f"[{i}/5] {s}: done in" in run.progress
    assert re.search(r"\[2/5\] partial: running \(ETA \d", run.progress)


def test_verdicts_are_computed_from_the_numbers(run: SimpleNamespace) -> None:
    rows = run.result.rows
    fewest = min(rows, key=lambda r: r["trainable"])
    smallest = min(rows, key=lambda r: r["stored_bytes"])
    said = "\n".join(run.result.verdicts)
    assert f"Fewest trainable parameters: {fewest['strategy']} ({fewest['trainable']:,})" in said
    assert f"Smallest per task (bytes stored): {smallest['strategy']}" in said
    assert "Least forgetting" in said
    # on the accuracy-vs-bytes front: nobody both as accurate and smaller
    for name in run.result.pareto:
        r = next(x for x in rows if x["strategy"] == name)
        assert not any(
            o["map50_95"] >= r["map50_95"] and o["stored_bytes"] < r["stored_bytes"] for o in rows if o is not r
        )


def _trained_model(nc: int) -> nn.Module:
    """yolo26n at the data's class count: the structure every strategy trains."""
    from ultralytics.nn.tasks import DetectionModel

    model: nn.Module = DetectionModel("yolo26n.yaml", nc=nc, verbose=False)  # type: ignore[no-untyped-call]
    return model


def _expected_lora(model: nn.Module, r: int, dora: bool) -> tuple[int, int]:
    """(trainable, adapted layers) of LoraYOLO's defaults, counted from the layers.

    Adapted: every ungrouped conv but the stem (reads the image), the class convs (new here: trained
    fully) and convs whose LoRA would outnumber their weights; each adds r (in k^2 + out) (DoRA:
    + out, its magnitude). Trained fully: every BatchNorm (weight, bias) and the class convs.
    """
    trainable = adapted = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            trainable += sum(p.numel() for p in m.parameters())
        if not isinstance(m, nn.Conv2d):
            continue
        if re.fullmatch(r"model\.23\.(one2one_)?cv3\.\d\.2", name):  # a class conv
            trainable += sum(p.numel() for p in m.parameters())
            continue
        k = m.kernel_size[0] * m.kernel_size[1]
        lora = r * (m.in_channels * k + m.out_channels)
        if m.groups > 1 or name.startswith("model.0.") or lora > m.weight.numel():
            continue
        adapted += 1
        trainable += lora + (m.out_channels if dora else 0)
    return trainable, adapted


def test_trainable_parameters_equal_the_formula(run: SimpleNamespace) -> None:
    model = _trained_model(nc=3)
    total = sum(p.numel() for p in model.parameters())

    def from_layer(first: int) -> int:  # parameters of layers first.. (Ultralytics' freeze=first)
        return sum(p.numel() for n, p in model.named_parameters() if int(n.split(".")[1]) >= first)

    rows = {r["strategy"]: r for r in run.result.rows}
    assert rows["full"]["trainable"] == total == rows["full"]["total_params"]
    assert rows["partial"]["freeze"] == 11 and rows["partial"]["trainable"] == from_layer(11)  # yolo26n backbone
    assert rows["head"]["freeze"] == 23 and rows["head"]["trainable"] == from_layer(23)
    trainable, adapted = _expected_lora(model, 8, True)
    assert (rows["dora"]["trainable"], rows["dora"]["adapted_layers"]) == (trainable, adapted)
    # LoRA+ at r=8: learning rates only (plain LoRA's count, checked at r=2 by the resume test)
    assert (rows["loraplus"]["trainable"], rows["loraplus"]["adapted_layers"]) == _expected_lora(model, 8, False)
    for row in rows.values():
        assert row["trainable_fraction"] == row["trainable"] / total


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_adapter_stored(out: Path, row: dict[str, Any]) -> None:
    """A LoRA-family row stores the adapter folder of its run, and counts its bytes."""
    name = row["strategy"]
    assert row["stored"] == f"train/{name}/weights/best_adapter"
    assert (out / row["stored"] / "adapter_model.safetensors").is_file()
    assert row["stored_bytes"] == _size(out / row["stored"]) > 0, name


def test_bytes_stored_equal_the_files(run: SimpleNamespace) -> None:
    from safetensors import safe_open

    rows = {r["strategy"]: r for r in run.result.rows}
    assert rows["full"]["stored"] == "train/full/weights/best.pt"
    for name in ("dora", "loraplus"):
        _check_adapter_stored(run.out, rows[name])
    state = _trained_model(nc=3).state_dict()
    for name, first in (("partial", 11), ("head", 23)):  # the trained layers alone
        with safe_open(run.out / rows[name]["stored"], "pt") as f:
            keys = set(f.keys())
        assert keys == {k for k in state if int(k.split(".")[1]) >= first}, name
    for r in rows.values():
        assert r["stored_bytes"] == _size(run.out / r["stored"]) > 0, r["strategy"]
    assert run.result.base["bytes"] == run.base.stat().st_size


def test_forgetting_with_the_adapter_off_is_the_base(run: SimpleNamespace) -> None:
    base = run.result.base
    for r in run.result.rows:
        if r["adapted_layers"] is not None:
            assert (r["base_map50_95_off"], r["base_map50_off"]) == (base["base_map50_95"], base["base_map50"])


def _cli(run: SimpleNamespace, *extra: str) -> tuple[int, str, str]:
    argv = ["yolo", "compare", f"model={run.base}", f"data={run.b}", f"base_data={run.a}", "epochs=1"]
    argv += [f"imgsz={IMGSZ}", f"out={run.out}", *(f"{k}={v}" for k, v in TRAIN.items()), *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        for k, v in run.guard.items():
            mp.setenv(k, v)
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


BAD = [  # (argument, strings the one-line error must contain)
    ("strategies=full,lora-8", ["unknown strategy 'lora-8'", "did you mean 'lora-r8'"]),
    ("strategies=fulll", ["unknown strategy 'fulll'", "did you mean 'full'"]),
    ("strategies=dor", ["unknown strategy 'dor'", "did you mean 'dora'"]),
    ("strategies=lora-r0", ["unknown strategy 'lora-r0'", "rank >= 1"]),
    ("base_data=nowhere.yaml", ["base_data='nowhere.yaml'", "no such file"]),
    ("freeze=3", ["freeze=", "set by compare itself"]),
    ("r=16", ["'r'", "strategies=lora-r4"]),
    ("epoch=3", ["'epoch'", "did you mean 'epochs'"]),
    ("optimizer=Foo", ["optimizer", "'Foo'"]),
]


@pytest.mark.parametrize(("arg", "needles"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_with_one_line_before_any_work(
    inputs: SimpleNamespace, arg: str, needles: list[str], tmp_path: Path
) -> None:
    code, _, err = _cli(inputs, f"out={tmp_path / 'never'}", arg)
    lines = [line for line in err.splitlines() if line.startswith("lorakit yolo: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert all(n in lines[0] for n in needles), (lines[0], needles)
    assert not (tmp_path / "never").exists()


def test_a_bad_strategy_name_from_python_is_a_config_error(inputs: SimpleNamespace, tmp_path: Path) -> None:
    from lorakit.yolo import compare

    with pytest.raises(ConfigError, match=r"unknown strategy 'lora-rank8'; did you mean"):
        compare(inputs.base, inputs.b, strategies=["lora-rank8"], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_folder_with_other_settings_is_refused_before_any_work(run: SimpleNamespace) -> None:
    from lorakit.yolo import compare

    before = {p: p.read_bytes() for p in (run.out / "results").iterdir()}
    with pytest.raises(ConfigError, match=r"settings\.json.*epochs: 1 there, 2 now"):
        compare(run.base, run.b, epochs=2, imgsz=IMGSZ, base_data=run.a, out=run.out, **TRAIN)
    assert {p: p.read_bytes() for p in (run.out / "results").iterdir()} == before


def test_an_interrupted_comparison_resumes_with_only_the_missing_strategies(run: SimpleNamespace) -> None:
    """Run last in this module: the same comparison with one strategy more, through the CLI.

    A strategy that was interrupted left no result (each is written whole or not at all), so
    it is missing exactly as ``lora-r2`` is here: one code path. ``lora-r2`` is also the module's
    plain LoRA run: its row gets the checks the shared run's rows get.
    """
    kept = RUN
    before = {s: (run.out / "results" / f"{s}.json").read_bytes() for s in kept}
    weights = {s: os.stat(run.out / "train" / s / "weights" / "best.pt").st_mtime_ns for s in kept}
    code, out, err = _cli(run, f"strategies={','.join(RUN)},{RESUMED}")
    assert code == 0, err[-3000:]
    for i, s in enumerate([*RUN, RESUMED], 1):
        ran = s == RESUMED
        assert (f"[{i}/6] {s}: running" in out) == ran and (f"[{i}/6] {s}: kept from an earlier run" in out) != ran
    # the strategies already done: not run again, same numbers in the new table
    assert {s: (run.out / "results" / f"{s}.json").read_bytes() for s in kept} == before
    assert {s: os.stat(run.out / "train" / s / "weights" / "best.pt").st_mtime_ns for s in kept} == weights
    rows = {r["strategy"]: r for r in json.loads((run.out / "results.json").read_text())["rows"]}
    old = {r["strategy"]: r for r in run.result.rows}
    assert all(rows[s] == old[s] for s in kept)
    new = rows[RESUMED]
    _check_columns(new)
    model = _trained_model(nc=3)
    total = sum(p.numel() for p in model.parameters())
    assert (new["trainable"], new["adapted_layers"]) == _expected_lora(model, 2, False)
    assert new["trainable_fraction"] == new["trainable"] / total and new["total_params"] == total
    _check_adapter_stored(run.out, new)
    base = run.result.base
    assert (new["base_map50_95_off"], new["base_map50_off"]) == (base["base_map50_95"], base["base_map50"])
    assert (run.out / "results" / f"{RESUMED}.json").is_file()
    assert f"| {RESUMED} |" in out  # the table is printed
    assert not run.network.exists() or run.network.read_text() == ""
