"""The demo (``python -m lorakit.yolo.demo``): a ``--quick`` run end to end, and its exit status.

The quick run spawns child interpreters, which the in-process network guard of
``conftest.py`` does not reach; ``child_network_guard`` records and refuses
every DNS lookup and connection there, and the test fails if anything was recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from yolo_helpers import child_network_guard

from lorakit.machine import cpu_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("demo")
    guard, log = child_network_guard(root)
    env = {**os.environ, **guard, "OMP_NUM_THREADS": "1"}
    for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "YOLO_AUTOINSTALL"):  # the demo must switch offline by itself
        env.pop(k, None)
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.yolo.demo", "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"proc": proc, "out": out, "network": log.read_text() if log.exists() else ""}


def test_quick_demo_runs_offline_and_passes_its_checks(quick: dict[str, Any]) -> None:
    proc, out = quick["proc"], quick["out"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert quick["network"] == ""
    for name in ("results.md", "results.json", "results.png", "base.pt", "lora_merged.onnx"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert "stage 6/6" in proc.stdout  # the top-level stage indicator
    assert "LoRA / full fine-tuning mAP50-95 on B" in proc.stdout  # the table is printed
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("| merged_equals", "| onnx_equals"))]
    assert len(lines) == 2 and all("ulp of scale" in line for line in lines), lines  # each states its bound
    assert f"on {cpu_name()} (" in (out / "results.md").read_text()  # figures name the CPU they came from


def test_quick_demo_json(quick: dict[str, Any]) -> None:
    res = json.loads((quick["out"] / "results.json").read_text())
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["full", "head", "lora"]
    total = res["total_params"]
    assert rows["full"]["trainable"] == total
    assert 0 < rows["head"]["trainable"] < rows["lora"]["trainable"] < 0.15 * total
    for r in rows.values():
        for key in ("stored_bytes", "epoch_s", "peak_rss_mib"):
            assert r[key] > 0, (r["arm"], key)
        assert 0.0 <= r["map50_95_b"] <= r["map50_b"] <= 1.0
    assert rows["lora"]["stored_bytes"] < rows["full"]["stored_bytes"]
    checks = res["checks"]
    assert set(checks) == {
        "base_weights_unchanged",
        "disabled_equals_base",
        "merged_equals_unmerged",
        "onnx_equals_pytorch",
    }
    assert all(c["ok"] for c in checks.values())
    off = checks["disabled_equals_base"]
    assert off["outputs_bitwise_equal"] is True
    assert (off["map_a_disabled"], off["map50_a_disabled"]) == (off["map_a_base"], off["map50_a_base"])
    assert rows["lora"]["map50_95_a_restored"] == res["base"]["map_a"]
    assert checks["base_weights_unchanged"]["compared"] > 100  # every conv weight outside the adapter
    for name in ("onnx_equals_pytorch", "merged_equals_unmerged"):  # per part, within its stated bound
        c = checks[name]
        for part in ("boxes", "scores"):
            assert c[f"{part}_max_abs_diff"] <= c[f"{part}_tolerance"], (name, part, c)
            assert "ulp" in c[f"{part}_rule"], (name, part, c)
    assert "px" in checks["onnx_equals_pytorch"]["boxes_rule"]
    for name in ("base_weights_unchanged", "disabled_equals_base"):
        assert checks[name]["tolerance"].startswith("exact"), (name, checks[name])
    assert res["summary"]["all_checks_passed"] is True
    assert "ratio" in res["summary"] and "wall_s" in res["summary"]


def test_a_failed_check_gives_exit_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorakit.yolo import demo

    def fake_child(job: str, out: Path, s: demo.Settings) -> dict[str, Any]:
        if job == "pretrain":
            (out / "base.pt").write_bytes(b"0")
            return {"seconds": 1.0}
        row = {
            "trainable": 1000,
            "stored": "x",
            "stored_bytes": 10,
            "epoch_s": 1.0,
            "peak_rss_mib": 1.0,
            "map_b": 0.5,
            "map50_b": 0.6,
        }
        if job != "lora":
            return row
        checks = {"disabled_equals_base": {"ok": True}, "onnx_equals_pytorch": {"ok": False, "max_abs_diff": 0.1}}
        return {
            **row,
            "adapted": 98,
            "r": 8,
            "map_a": 0.7,
            "map50_a": 0.8,
            "base_map_a": 0.7,
            "base_map50_a": 0.8,
            "checks": checks,
        }

    monkeypatch.setattr(demo, "_run_child", fake_child)
    settings = demo.Settings(n_train=2, n_val=1, imgsz=32, pretrain_epochs=1, epochs=1)
    assert demo.run(tmp_path, settings) == 1
    assert "FAILED checks: onnx_equals_pytorch" in capsys.readouterr().err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["summary"]["all_checks_passed"] is False
