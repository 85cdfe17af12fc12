"""The integration-independent compare core (lorakit.compare): strategy names, the result store, the
progress line and the report, on hand-made rows (the YOLO runs are in tests/yolo/test_compare.py)."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from lorakit.compare.report import Axis, Column, fmt_bytes, markdown_table, pareto, verdicts
from lorakit.compare.runner import run_missing
from lorakit.compare.store import Progress, ResultStore, duration
from lorakit.compare.strategies import Catalogue
from lorakit.errors import ConfigError, StrategyFailedError

CAT = Catalogue(
    fixed={"full": "full fine-tuning", "head": "head only", "dora": "DoRA"},
    families={"lora-r": "LoRA, r={r}"},
    default=("full", "lora-r8"),
)


def test_pick_takes_fixed_names_any_rank_and_the_default() -> None:
    assert CAT.pick(None) == ["full", "lora-r8"]
    assert CAT.pick("head, lora-r2,lora-r64") == ["head", "lora-r2", "lora-r64"]
    assert CAT.pick(["dora", "full"]) == ["dora", "full"]
    assert CAT.describe("lora-r32") == "LoRA, r=32"


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("lora-8", ["'lora-8'", "did you mean 'lora-r8'"]),
        ("ful", ["'ful'", "did you mean 'full'"]),
        ("lora-r0", ["'lora-r0'", "rank >= 1"]),
        ("zzz", ["'zzz'", "known: full, head, dora, lora-r8, lora-rN"]),
        ("full,full", ["'full' named more than once"]),
        (",", ["no strategy named"]),
    ],
)
def test_bad_names_are_refused_with_a_hint(spec: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        CAT.pick(spec)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert str(info.value).startswith("strategies=")


def test_the_store_keeps_results_atomically_and_refuses_other_settings(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "run", {"epochs": 1, "data": "d.yaml"})
    assert store.get("full") is None
    store.put("full", {"map": 0.5})
    assert ResultStore(tmp_path / "run", {"data": "d.yaml", "epochs": 1}).get("full") == {"map": 0.5}
    assert not [p for p in (tmp_path / "run" / "results").iterdir() if p.name.startswith(".")]  # no temp left
    with pytest.raises(ConfigError, match=r"settings\.json: .*\(epochs: 1 there, 2 now\); use another folder"):
        ResultStore(tmp_path / "run", {"epochs": 2, "data": "d.yaml"})
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["epochs"] == 1  # untouched
    fresh = ResultStore(tmp_path / "run", {"epochs": 2, "data": "d.yaml"}, overwrite=True)
    assert fresh.get("full") is None


def test_progress_lines_carry_an_eta_from_the_times_so_far() -> None:
    out = io.StringIO()
    p = Progress(["a", "b", "c"], ["b", "c"], out)
    p.kept("a", 30.0)
    p.start("b")
    p.done("b", "ok")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] a: kept from an earlier run"
    assert lines[1] == "[2/3] b: running (ETA 1m00s)"  # 2 left at the mean of the kept one's 30 s
    assert re.fullmatch(r"\[2/3\] b: done in \d+s: ok \(ETA \d+s\)", lines[2])
    assert duration(3725) == "1h02m" and duration(59.4) == "59s"


ROWS = [
    {"strategy": "full", "acc": 0.50, "bytes": 5_000_000, "s": 2.0},
    {"strategy": "lora", "acc": 0.48, "bytes": 900_000, "s": 2.5},
    {"strategy": "head", "acc": 0.30, "bytes": 1_000_000, "s": 1.0},
    {"strategy": "tie", "acc": 0.50, "bytes": 6_000_000, "s": None},
]
ACC = Axis("acc", "Most accurate", "max", lambda v: f"{v:.2f}")
BYTES = Axis("bytes", "Smallest", "min", fmt_bytes)


def test_verdicts_name_each_axis_winner_from_the_numbers() -> None:
    said = verdicts(ROWS, [ACC, BYTES, Axis("s", "Fastest", "min", str), Axis("gone", "Nobody", "max", str)])
    assert said == [
        "Most accurate: full and tie (0.50), then lora (0.48).",
        "Smallest: lora (879 KB), then head (977 KB).",
        "Fastest: head (1.0), then full (2.0).",  # a row without the value is left out
    ]  # an axis no row has is left out


def test_pareto_keeps_the_strategies_nobody_beats_on_both() -> None:
    # head is larger and less accurate than lora; tie is as accurate as full and larger
    assert pareto(ROWS, ACC, BYTES) == ["lora", "full"]


def test_a_tie_between_all_is_said_once() -> None:
    rows = [{"strategy": n, "acc": 0.0} for n in "abc"]
    assert verdicts(rows, [ACC]) == ["Most accurate: all 3 tie (0.00)."]


def test_markdown_table_shows_missing_values_as_na() -> None:
    text = markdown_table(ROWS[:2] + [{"strategy": "x"}], [Column("strategy", "strategy"), Column("acc", "acc")])
    assert text.splitlines()[1] == "|---|---:|" and text.splitlines()[-1] == "| x | n/a |"


# A job module as an integration writes one: reads the folder's settings, keeps a result, or fails.
_JOB = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    def main(argv):
        folder, name = Path(argv[0]), argv[1]
        settings = json.loads((folder / "settings.json").read_text())
        if name == "bad":
            print("training went wrong: out of patience")
            return 3
        if name == "crash":
            raise RuntimeError("the job broke")
        # pytest is imported in a fork of this test's process, not in a fresh interpreter
        result = {"n": len(name), "lr": settings["lr"], "forked": "pytest" in sys.modules}
        (folder / "results" / f"{name}.json").write_text(json.dumps(result))
        return 0

    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("fork", [False, True], ids=["interpreter", "fork"])
def test_run_missing_runs_only_what_is_missing_and_names_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fork: bool
) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "fake_job.py").write_text(_JOB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "jobs"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path / "jobs"))
    monkeypatch.delitem(sys.modules, "fake_job", raising=False)
    store = ResultStore(tmp_path / "run", {"lr": 0.1})
    store.put("kept", {"n": 99, "wall_s": 5.0})
    out = io.StringIO()
    results = run_missing(store, ["kept", "abc"], "fake_job", lambda r: f"n={r['n']}", out, fork=fork)
    assert results == [{"n": 99, "wall_s": 5.0}, {"n": 3, "lr": 0.1, "forked": fork}]
    assert "[1/2] kept: kept from an earlier run" in out.getvalue() and "done in" in out.getvalue()
    with pytest.raises(StrategyFailedError, match=r"'bad' failed \(exit status 3\): training went wrong"):
        run_missing(store, ["kept", "abc", "bad"], "fake_job", str, io.StringIO(), fork=fork)
    assert store.get("abc") == {"n": 3, "lr": 0.1, "forked": fork} and store.get("bad") is None
    assert (tmp_path / "run" / "logs" / "bad.log").read_text().startswith("training went wrong")
    # an exception: exit status 1, its last line quoted, the traceback in the log
    with pytest.raises(StrategyFailedError, match=r"'crash' failed \(exit status 1\): RuntimeError: the job broke"):
        run_missing(store, ["crash"], "fake_job", str, io.StringIO(), fork=fork)
    assert "Traceback" in (tmp_path / "run" / "logs" / "crash.log").read_text()


def test_bytes_under_a_kib_are_shown_as_bytes() -> None:
    assert [fmt_bytes(n) for n in (300, 1024, 120_000, 5_300_000)] == ["300 B", "1 KB", "117 KB", "5.05 MB"]
