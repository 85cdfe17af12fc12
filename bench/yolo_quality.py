"""LoRA vs full vs head-only fine-tuning quality on the synthetic A -> B detection task (yolo26n, CPU).

    python bench/yolo_quality.py                          # every experiment below (~25 min on 2 cores)
    python bench/yolo_quality.py --only full_lr1e-3 lora_r8_lr1e-2

The base: yolo26n from its YAML, trained 40 epochs on domain A (64 train / 32 val images of
160 px, AdamW lr 0.002, batch 8 = nbs, no warmup), made once and reused. Every experiment
then fine-tunes it for 15 epochs on domain B (3 classes, seed 1 data) with the same
settings except those it names, in its own process with one thread, and reports Ultralytics'
mAP50-95/mAP50 on B's val split (``YOLO(last.pt).val``). Results are appended to
``<out>/results.jsonl`` and summarised in bench/yolo_quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name: (arm, overrides of the Ultralytics train args, LoRA options). lr0 is AdamW's.
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "full_lr5e-4": ("full", {"lr0": 0.0005}, {}),
    "full_lr1e-3": ("full", {"lr0": 0.001}, {}),
    "full_lr2e-3": ("full", {"lr0": 0.002}, {}),
    "full_lr5e-3": ("full", {"lr0": 0.005}, {}),
    "full_lr1e-3_seed1": ("full", {"lr0": 0.001, "seed": 1}, {}),
    "full_lr1e-3_seed2": ("full", {"lr0": 0.001, "seed": 2}, {}),
    "head_lr2e-3": ("head", {"lr0": 0.002}, {}),
    "head_lr1e-2": ("head", {"lr0": 0.01}, {}),
    "lora_r8_lr2e-3": ("lora", {"lr0": 0.002}, {}),
    "lora_r8_lr5e-3": ("lora", {"lr0": 0.005}, {}),
    "lora_r8_lr1e-2": ("lora", {"lr0": 0.01}, {}),
    "lora_r8_lr1.5e-2": ("lora", {"lr0": 0.015}, {}),
    "lora_r8_lr2e-2": ("lora", {"lr0": 0.02}, {}),
    "lora_r8_lr1e-2_seed1": ("lora", {"lr0": 0.01, "seed": 1}, {}),
    "lora_r8_lr1e-2_seed2": ("lora", {"lr0": 0.01, "seed": 2}, {}),
    "lora_r8_a16_lr1e-2": ("lora", {"lr0": 0.01}, {"alpha": 16}),
    "lora_r8_lr5e-3_seed1": ("lora", {"lr0": 0.005, "seed": 1}, {}),
    "lora_r8_lr7e-3": ("lora", {"lr0": 0.007}, {}),
    "lora_r8_lr1e-2_nopsa22": ("lora", {"lr0": 0.01}, {"exclude": ["model.22.m.0.1.*"]}),
    "lora_r8_lr1e-2_nopsa22_seed1": ("lora", {"lr0": 0.01, "seed": 1}, {"exclude": ["model.22.m.0.1.*"]}),
    "lora_r8_lr1e-2_bn": ("lora", {"lr0": 0.01}, {"adapt_bn": True}),
    "lora_r8_lr1e-2_bn_seed1": ("lora", {"lr0": 0.01, "seed": 1}, {"adapt_bn": True}),
    "lora_r8_lr2e-2_bn": ("lora", {"lr0": 0.02}, {"adapt_bn": True}),
    "lora_r8_lr7e-3_bn": ("lora", {"lr0": 0.007}, {"adapt_bn": True}),
    "lora_r8_lr7e-3_bn_seed1": ("lora", {"lr0": 0.007, "seed": 1}, {"adapt_bn": True}),
    "lora_r4_headfull_lr1e-2": ("lora", {"lr0": 0.01}, {"r": 4, "exclude": ["model.23.*"], "train": ["model.23"]}),
    # LoraYOLO's own defaults ("defaults" arm: r=8, adapt_bn, lr 0.007, every layer adapted, channels-last
    # on an x86 CPU), and with one setting changed: the early layers frozen (frozen_stride=4), the usual
    # memory layout (Ultralytics' channels_last=False)
    **{
        f"lora_defaults{tag}_seed{seed}": ("defaults", {"lr0": 0.007, "seed": seed, **train}, opts)
        for tag, train, opts in (
            ("", {}, {}),
            ("_stride4", {}, {"frozen_stride": 4}),
            ("_nchw", {"channels_last": False}, {}),
        )
        for seed in (0, 1, 2)
    },
}
IMGSZ = 160
COMMON = {
    "imgsz": IMGSZ,
    "batch": 8,
    "nbs": 8,
    "warmup_epochs": 0,
    "workers": 0,
    "plots": False,
    "device": "cpu",
    "seed": 0,
    "val": False,
    "optimizer": "AdamW",
    "exist_ok": True,
    "verbose": False,
}


def _offline(out: Path) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from lorakit.yolo import offline

    offline.enable(out / "yolo_config")
    import torch

    torch.set_num_threads(1)


def _map(weights: Path, data: Path) -> tuple[float, float]:
    from ultralytics import YOLO

    r = YOLO(str(weights)).val(data=str(data), imgsz=IMGSZ, batch=16, workers=0, plots=False, device="cpu")
    return float(r.box.map), float(r.box.map50)


def _magnitudes(weights: Path, data: Path) -> tuple[float, float]:
    """Largest |activation| out of layer 22 (last neck block, P5) and largest |class logit|, on 4 val images."""
    import torch
    from ultralytics import YOLO

    from lorakit.yolo.demo import Settings, _images

    model = YOLO(str(weights)).model.float().eval()
    out: dict[int, torch.Tensor] = {}
    model.model[22].register_forward_hook(lambda _m, _i, o: out.__setitem__(22, o))
    with torch.no_grad():
        _, preds = model(_images(data, Settings()))
    return float(out[22].abs().max()), float(preds["one2many"]["scores"].abs().max())


def pretrain(out: Path) -> None:
    from ultralytics import YOLO

    from lorakit.yolo import make_dataset

    a = make_dataset(out / "data" / "A", domain="A", n_train=64, n_val=32, imgsz=IMGSZ, seed=0)
    make_dataset(out / "data" / "B", domain="B", n_train=64, n_val=32, imgsz=IMGSZ, seed=1)
    model = YOLO("yolo26n.yaml")
    model.train(data=str(a), epochs=40, lr0=0.002, project=str(out / "runs"), name="base", **COMMON)
    (out / "base.pt").write_bytes(Path(model.trainer.last).read_bytes())
    print("BASE", json.dumps(dict(zip(("map_a", "map50_a"), _map(out / "base.pt", a), strict=True))))


def adapt(out: Path, name: str) -> dict[str, Any]:
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from lorakit.yolo import LoraYOLO, detector_config

    arm, overrides, lora = EXPERIMENTS[name]
    data = out / "data" / "B" / "data.yaml"
    args = {**COMMON, "epochs": 15, "project": str(out / "runs"), "name": name, **overrides}
    t0 = time.perf_counter()
    if arm == "lora":
        lora = dict(lora)
        shape = DetectionModel("yolo26n.yaml", nc=3, verbose=False)  # for the target paths only
        config = detector_config(
            shape,
            r=lora.pop("r", 8),
            alpha=lora.pop("alpha", None),
            exclude=lora.pop("exclude", ()),
            train_modules=lora.pop("train", ()),
        )
        model = LoraYOLO(str(out / "base.pt"), config=config, adapt_bn=lora.pop("adapt_bn", False))
    elif arm == "defaults":
        model = LoraYOLO(str(out / "base.pt"), **lora)
    else:
        model = YOLO(str(out / "base.pt"))
        if arm == "head":
            args["freeze"] = 23
    model.train(data=str(data), **args)
    trainable = sum(p.numel() for p in model.trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in DetectionModel("yolo26n.yaml", nc=3, verbose=False).parameters())
    m, m50 = _map(Path(model.trainer.last), data)
    act22, logit = _magnitudes(Path(model.trainer.last), data)
    return {
        "name": name,
        "act22": act22,
        "max_logit": logit,
        "arm": arm,
        "map": m,
        "map50": m50,
        "trainable": trainable,
        "fraction": trainable / total,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/yolo_quality"))
    p.add_argument("--only", nargs="*", choices=sorted(EXPERIMENTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = args.out.resolve()
    if args.child:
        _offline(out)
        if args.child == "pretrain":
            pretrain(out)
        else:
            print("RESULT", json.dumps(adapt(out, args.child)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [sys.executable, __file__, "--out", str(out), "--child"]
    if not (out / "base.pt").exists():
        subprocess.run([*me, "pretrain"], env=env, check=True)
    for name in args.only or EXPERIMENTS:
        proc = subprocess.run([*me, name], env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[-1][7:])
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        print(
            f"{name:30s} mAP50-95 {r['map']:.4f}  mAP50 {r['map50']:.4f}  trainable {r['fraction']:.1%}  "
            f"act22 {r['act22']:.3g}  max logit {r['max_logit']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
