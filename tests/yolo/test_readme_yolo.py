"""README.md's ```py YOLO blocks, run in order in one working folder with tiny stand-ins for the
reader's files: ``yolo26n.pt``/``base.pt`` -> a random yolo26n saved here, ``data.yaml`` -> a
synthetic dataset, ``image.jpg`` -> a generated image, and a 1-epoch training at imgsz 64."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from yolo_helpers import NETWORK_REFUSED, TINY_TRAIN, save_random_detector

from lorakit.yolo import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.readme_blocks
from tests.readme_blocks import README, blocks, runner, substitute  # noqa: E402


def test_readme_yolo_setup_lines_run_in_a_fresh_process() -> None:
    """The imports and offline.enable() of the first YOLO block, as a new process runs them: this
    session's conftest enabled offline mode already, which would hide an enable() that comes too late."""
    first = next(b for b in blocks() if runner(b) == "py")
    setup = [ln for ln in first.text.splitlines() if ln.startswith(("from ", "import ", "offline."))]
    assert any("offline.enable()" in ln for ln in setup), first.text
    # Without the switches the conftest put in os.environ: a reader's shell does not have them.
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR")}
    code = NETWORK_REFUSED + "\n".join(setup)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"README.md line {first.line}:\n" + "\n".join(setup) + "\n" + done.stderr[-2000:]


def test_readme_yolo_blocks_run_in_order(tmp_path: Path, monkeypatch) -> None:
    # The README's own offline.enable() runs again here: with YOLO_CONFIG_DIR already set by the
    # conftest it keeps that dir, so it does not fail although ultralytics may be imported already.
    work, stand = tmp_path / "work", tmp_path / "stand_ins"
    work.mkdir()
    stand.mkdir()
    monkeypatch.chdir(work)  # the blocks write adapters/..., night.pt relative to the working folder
    base = save_random_detector(stand / "base.pt", seed=0)
    data = make_dataset(stand / "data", n_train=8, n_val=4, imgsz=64, seed=0)
    image = stand / "image.jpg"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    # project= keeps the run inside this test's folder whatever Ultralytics' runs_dir setting is.
    tiny = ", ".join(f"{k}={v!r}" for k, v in {**TINY_TRAIN, "project": str(work / "runs" / "detect")}.items())
    stand_ins: dict[str, str | None] = {
        "yolo26n.pt": str(base),
        "base.pt": str(base),
        "data.yaml": str(data),
        "image.jpg": str(image),
        "epochs=20, imgsz=640": f"epochs=1, imgsz=64, {tiny}",
        "adapters/my_domain": None,  # written by the first block, kept as written
        "night.pt": None,
        "best.pt": None,  # named in a comment
    }
    ns: dict[str, object] = {"__name__": "readme"}
    ran = 0
    for block in blocks():
        if runner(block) != "py":
            continue
        if "model" in ns:  # the folders the previous block's training produced
            trained = ns["model"].adapter_dir  # type: ignore[attr-defined]
            assert trained is not None and trained.name == "best_adapter"
            stand_ins["runs/detect/train/weights/best_adapter"] = str(trained)
            # a second run's adapter: the first one's copy stands in (loaded under another name)
            stand_ins["runs/detect/train2/weights/best_adapter"] = str(work / "adapters" / "my_domain")
        exec(compile(substitute(block, stand_ins), f"{README}:{block.line}", "exec"), ns)
        ran += 1
    assert ran >= 2
    assert (work / "adapters" / "my_domain" / "adapter_config.json").is_file()
    assert (work / "night.pt").is_file() and list((work / "runs").rglob("*.onnx"))


def test_readme_yolo_cli_block_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """The ``lorakit yolo`` block, line by line through the command's entry point (in this process: a
    subprocess per line would import torch and ultralytics five times), with the same stand-ins."""
    import shlex

    from lorakit.cli import main

    work, stand = tmp_path / "work", tmp_path / "stand_ins"
    (stand / "images").mkdir(parents=True)
    work.mkdir()
    monkeypatch.chdir(work)
    base = save_random_detector(stand / "base.pt", seed=0)
    data = make_dataset(stand / "data", n_train=8, n_val=4, imgsz=64, seed=0)
    cv2.imwrite(str(stand / "images" / "a.jpg"), np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    runs = work / "runs"  # project= on each writing verb: the outputs stay here whatever runs_dir is
    best = runs / "detect" / "train" / "weights" / "best_adapter"
    tiny = " ".join(f"{k}={v}" for k, v in TINY_TRAIN.items() if k != "verbose")
    stand_ins: dict[str, str | None] = {
        "base.pt": str(base),
        "data.yaml": str(data),
        "epochs=20 imgsz=640": f"epochs=1 imgsz=64 {tiny} project={runs / 'detect'} name=train",
        "runs/detect/train/weights/best_adapter": str(best),
        "DIR": str(best),
        "images/": f"{stand / 'images'} imgsz=64 project={runs / 'predict'}",
        "format=onnx": "format=onnx imgsz=64",
        "merged.pt": None,
    }
    (block,) = [b for b in blocks() if runner(b) == "bash-yolo"]  # one block; a second needs its own stand-ins
    val_extra = ["imgsz=64", "batch=8", "plots=False", f"project={runs / 'val'}"]  # val's line has no token to swap
    for line in substitute(block, stand_ins).splitlines():
        argv = shlex.split(line, comments=True)
        argv += val_extra if argv[:3] == ["lorakit", "yolo", "val"] else []
        assert argv[:2] == ["lorakit", "yolo"], line
        code = main(argv[1:])
        assert code == 0, f"README.md line {block.line}: {line}\n{capsys.readouterr().err[-3000:]}"
    assert (work / "merged.pt").is_file() and list(tmp_path.rglob("*.onnx"))
