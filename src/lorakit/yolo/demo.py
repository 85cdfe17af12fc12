"""The lorakit YOLO demo: full fine-tuning vs head-only vs LoRA, measured, checked, exported.

``python -m lorakit.yolo.demo`` (``--quick`` for a tiny smoke run, ``--out DIR``
for the output folder, default ``runs/demo``). No downloads, no network:

1. **data**: synthetic domains A and B (:func:`lorakit.yolo.make_dataset`).
2. **pre-train**: yolo26n built from its YAML and trained on A: the "base".
3. **adapt** the base to B three ways, with equal epochs, seed and data: full
   fine-tuning, head only (``freeze=23``: layers 0-22 frozen), and LoRA
   (:class:`lorakit.yolo.LoraYOLO` with its defaults). Every training runs on
   Ultralytics' trainer with lorakit's speed-ups (:mod:`lorakit.yolo.speed`; LoRA's
   trainer has them built in), so the times compare the methods, not the trainers.
4. **checks** on the LoRA model: with the adapter disabled it computes the base
   model *exactly* (every output bitwise, and the same mAP on A); merged equals
   unmerged, and the merged model exported to ONNX gives ONNX Runtime outputs
   equal to PyTorch's, each within a tolerance set by the outputs' scale and
   float32 precision (:mod:`lorakit.yolo.tolerance`; the bounds and why are
   beside their constants below, and each printed check line states its bound).

Each training runs in its own child interpreter with one thread, so each peak
RSS is that arm's own. The table goes to the terminal and to ``results.md``,
``results.json`` and ``results.png`` in the output folder. The exit status is 1
when a check fails. The quality ratio (LoRA's mAP50-95 on B over full
fine-tuning's) is reported, not enforced: it is a measurement on a small
synthetic task, not an invariant.

"Adapter disabled" means the base model back, as PEFT's ``disable_adapter()``
treats its ``modules_to_save``: the LoRA deltas switched off
(:func:`lorakit.disabled`) *and* the base's own versions of the modules the
adapter trains fully put back: the class convs (B has 3 classes and A 2, so
they were re-initialised) and, with ``LoraYOLO``'s default ``adapt_bn=True``,
the BatchNorm layers. The adapter file carries both. Everything else in the
trained model is checked to be bitwise the base.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from ..compare.measure import peak_rss_mib, size
from ..compare.report import fmt_bytes
from ..machine import cpu_name
from .measure import EpochMeter, open_yolo
from .tolerance import Tolerance, compare_parts

ARMS = ("full", "head", "lora")
TITLES = {"base": "base (pre-trained on A)", "full": "full fine-tuning", "head": "head only", "lora": "LoRA (lorakit)"}
# The checks' tolerances (see lorakit.yolo.tolerance for the rule: ulps of the output's largest magnitude, with a
# floor in the output's units). Each is stated in the printed check line.
#
# Adapter disabled vs the base, and the base's weights in the trained model: the disabled LoRA layers call the
# base's own convs, and the base's own modules are put back, so both sides run the same operations on the same
# values in one process with one thread: bitwise equal on any CPU. Copied weights involve no arithmetic at all.
# A difference is a bug, never rounding, so the bound is zero.
EXACT = Tolerance.exact("same operations on the same values, one process and thread")
# Merged vs unmerged (raw head outputs: box distances in grid cells, class logits; both up to ~20): the merged
# conv computes x*(W + s*B*A) where the unmerged one computes x*W + s*(x*A)*B, so each of the ~100 adapted convs
# rounds differently by a few ulps of its activations, and this accumulates through the 23 layers. Measured on
# an AMD EPYC (full demo): 8.6e-6 at logits up to 17.1 and 1.9e-6 at boxes up to 6.1, i.e. <= 5 eps of the
# largest output. 1024 ulps (1.2e-4 relative: 2.1e-3 at 17) leaves ~200x for other CPUs' kernels and is still
# ~5000x below what a wrong merge gives: the printed adapter_effect (LoRA switched off; 10.6 there).
MERGE_TOL = Tolerance(1024, why="float32 rounding of a different operation order, accumulated over 23 layers")
# ONNX Runtime vs PyTorch on the exported (decoded) output: boxes in pixels (values up to ~1.3 x imgsz) and class
# probabilities in [0, 1]. Different kernels (ONNX Runtime's vs oneDNN's, chosen by the CPU's vector width and FMA)
# sum in different orders: one AMD EPYC measured 1.07e-4 px at boxes up to ~200 px (~7 ulps; one float32 ulp at
# 200 is 1.5e-5), another 3.1e-5 px at 157 px and 1.3e-6 on the probabilities. Boxes: 64 ulps of the largest
# coordinate (1.5e-3 px at 200 px), never below 1e-3 px: a thousandth of a pixel cannot move a detection, and a
# wrong export moves boxes by pixels. Probabilities: 1e-4, ten times finer than the finest confidence threshold
# anyone sets (conf=0.001 for mAP), and ~100x the difference measured.
ONNX_TOLS = {
    "boxes": Tolerance(64, 1e-3, "px", "ONNX Runtime vs PyTorch kernels, ~7 ulps measured at 200 px"),
    "scores": Tolerance(64, 1e-4, "probability", "below any confidence threshold's resolution"),
}
TARGET_RATIO, TARGET_FRACTION = 0.95, 0.15


@dataclass(frozen=True)
class Settings:
    """Sizes and hyper-parameters of one demo run (``--quick`` shrinks everything, for the tests)."""

    n_train: int = 64
    n_val: int = 32
    imgsz: int = 160
    batch: int = 8
    pretrain_epochs: int = 30
    epochs: int = 15
    # AdamW learning rates; each arm at the best of those tried in bench/yolo_quality.md. LoRA is not listed:
    # it runs with LoraYOLO's defaults (optimizer="auto": AdamW, lr 0.007).
    pretrain_lr: float = 0.002
    lr_full: float = 0.001
    lr_head: float = 0.01
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        return cls(n_train=8, n_val=4, imgsz=64, pretrain_epochs=0, epochs=1)

    def train_args(self, out: Path, name: str, epochs: int) -> dict[str, Any]:
        """Ultralytics ``train`` arguments shared by every run."""
        return {
            "epochs": epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            # Tiny runs: nbs=batch makes every batch an optimizer step (nbs=64 accumulates 8 batches), and
            # Ultralytics' 3 warmup epochs would spend most of a short run at a low learning rate.
            "nbs": self.batch,
            "warmup_epochs": 0,
            "val": False,  # validate once, after the last epoch
            "workers": 0,
            "plots": False,
            "device": "cpu",
            "seed": self.seed,
            # One CPU thread is deterministic already; deterministic=True would also import torch._inductor
            # (about 3.5 s per process) for use_deterministic_algorithms.
            "deterministic": False,
            "project": str(out / "train"),
            "name": name,
            "exist_ok": True,
            "verbose": False,
        }


# --------------------------------------------------------------------------------------
# child side: one job per interpreter, result written to <out>/<job>.json
# --------------------------------------------------------------------------------------


def _data(out: Path, domain: str) -> Path:
    return out / "data" / domain / "data.yaml"


def _val_file(weights: Path, data: Path, s: Settings) -> tuple[float, float]:
    """mAP50-95 and mAP50 of a checkpoint, from Ultralytics' own validator (``YOLO(weights).val``)."""
    m = open_yolo(weights).val(data=str(data), verbose=False, **_val_args(data, s))
    return float(m.box.map), float(m.box.map50)


def _val_args(data: Path, s: Settings) -> dict[str, Any]:
    """Validator arguments; its run folders go to ``<out>/val`` (``data`` is ``<out>/data/<domain>/data.yaml``)."""
    return {
        "imgsz": s.imgsz,
        "batch": 16,
        "workers": 0,
        "plots": False,
        "device": "cpu",
        "project": str(data.parents[2] / "val"),
        "name": "val",
    }


def _same_model(model: Any, verbose: bool = True) -> Any:
    return model


def _val_module(module: Any, data: Path, s: Settings) -> tuple[float, float]:
    """Ultralytics' validator on an in-memory detector, *unfused*.

    A model with LoRA layers cannot be fused, so the base it is compared with is
    validated the same unfused way; both then run exactly the same arithmetic.
    The validator freezes ``module``'s parameters (``requires_grad=False``).
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    module.float().eval()
    module.__dict__["fuse"] = partial(_same_model, module)  # AutoBackend calls model.fuse(): keep the layers as is
    args = {"data": str(data), **_val_args(data, s)}
    validator = DetectionValidator(args={**args, "mode": "val", "verbose": False})
    try:
        validator(model=module)
    finally:
        del module.__dict__["fuse"]
    box = validator.metrics.box
    return float(box.map), float(box.map50)


def _images(data: Path, s: Settings, n: int = 4) -> Any:
    """``n`` validation images of a dataset as a float batch (N, 3, imgsz, imgsz) in [0, 1], RGB."""
    import cv2
    import numpy as np
    import torch

    files = sorted((data.parent / "images" / "val").glob("*.png"))[:n]
    imgs = [cv2.resize(cv2.imread(str(f)), (s.imgsz, s.imgsz))[:, :, ::-1] for f in files]  # type: ignore[arg-type]
    return torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy()).float() / 255


def _raw(model: Any, x: Any) -> dict[str, Any]:
    """Every raw head output, flattened: ``boxes`` (box distances in grid cells) and ``scores`` (class logits)
    of both YOLO26 heads; no top-k, so no ties."""
    import torch

    _, preds = model(x)
    heads = [preds[k] for k in sorted(preds)] if "one2many" in preds else [preds]
    return {k: torch.cat([h[k].flatten() for h in heads]) for k in ("boxes", "scores")}


def _plain_trainer() -> Any:
    """Ultralytics' detection trainer on lorakit's speed-ups (:mod:`lorakit.yolo.speed`), which the LoRA
    arm has too: the arms' times then differ by what they train, not by the trainer."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from .speed import with_speedups

    return with_speedups(DetectionTrainer)


def _job_pretrain(out: Path, s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = open_yolo("yolo26n.yaml")
    meter = EpochMeter(model)
    model.train(
        trainer=_plain_trainer(),
        data=str(_data(out, "A")),
        optimizer="AdamW",
        lr0=s.pretrain_lr,
        **s.train_args(out, "pretrain", s.pretrain_epochs),
    )
    shutil.copyfile(model.trainer.last, out / "base.pt")
    return {"seconds": time.perf_counter() - t0, "epoch_s": meter.epoch_seconds(), "peak_rss_mib": peak_rss_mib()}


def _job_plain(out: Path, s: Settings, arm: str) -> dict[str, Any]:
    """Full or head-only fine-tuning with Ultralytics' trainer (on lorakit's speed-ups, as LoRA's)."""
    from safetensors.torch import save_file

    model = open_yolo(out / "base.pt")
    meter = EpochMeter(model)
    extra = {"freeze": 23} if arm == "head" else {}  # layers 0-22 frozen: only Detect (layer 23) trains
    t0 = time.perf_counter()
    lr = s.lr_head if arm == "head" else s.lr_full
    model.train(
        trainer=_plain_trainer(),
        data=str(_data(out, "B")),
        optimizer="AdamW",
        lr0=lr,
        **extra,
        **s.train_args(out, arm, s.epochs),
    )
    seconds, rss = time.perf_counter() - t0, peak_rss_mib()
    best = Path(model.trainer.best)
    if arm == "head":  # what must be stored per domain: the head's weights
        head = open_yolo(best).model.model[-1]
        stored = out / "head_weights.safetensors"
        save_file({k: v.float().contiguous() for k, v in head.state_dict().items()}, str(stored))
    else:
        stored = best
    m, m50 = _val_file(best, _data(out, "B"), s)
    return {
        "trainable": meter.trainable,
        "stored": str(stored.relative_to(out)),
        "stored_bytes": size(stored),
        "epoch_s": meter.epoch_seconds(),
        "train_s": seconds,
        "peak_rss_mib": rss,
        "map_b": m,
        "map50_b": m50,
    }


def _job_lora(out: Path, s: Settings) -> dict[str, Any]:
    """LoRA fine-tuning with LoraYOLO's defaults, then every check."""
    from copy import deepcopy

    import torch

    import lorakit

    from .layout import to_usual_layout
    from .model import LoraYOLO

    model = LoraYOLO(str(out / "base.pt"))
    meter = EpochMeter(model)
    t0 = time.perf_counter()
    model.train(data=str(_data(out, "B")), **s.train_args(out, "lora", s.epochs))
    seconds, rss = time.perf_counter() - t0, peak_rss_mib()
    trainer: Any = model.trainer
    adapter = model.save_adapter(out / "lora_adapter")
    m, m50 = _val_file(Path(trainer.best), _data(out, "B"), s)
    result: dict[str, Any] = {
        "adapted": len(trainer.lora_report.targets),
        "r": trainer.lora_config.r,
        "trainable": meter.trainable,
        "stored": str(adapter.relative_to(out)),
        "stored_bytes": size(adapter),
        "epoch_s": meter.epoch_seconds(),
        "train_s": seconds,
        "peak_rss_mib": rss,
        "map_b": m,
        "map50_b": m50,
    }
    lora = trainer.ema.ema.float().eval()  # the final EMA, unmerged (val=False: best.pt is this epoch)
    to_usual_layout(lora)  # trained channels-last on an x86 CPU; the base runs in the usual layout
    base = open_yolo(out / "base.pt").model.float().eval()
    checks: dict[str, Any] = {}

    # 1. Adapter disabled == base, exactly. The adapter = LoRA factors + its fully trained modules (the new
    # class convs, and BatchNorm layers when they adapt); every other tensor must still be the base's, bitwise.
    fully = _train_module_paths(lora, trainer.lora_config)
    own = tuple(f"{p}." for p in fully)
    ref, sd = base.state_dict(), lora.state_dict()
    kept = [k for k in sd if ".lora." not in k and not k.startswith(own)]
    differ = [k for k in kept if k not in ref or not torch.equal(sd[k], ref[k])]
    missing = [k for k in ref if not k.startswith(own) and k not in sd]
    checks["base_weights_unchanged"] = {
        "ok": not differ and not missing and len(kept) > 0,
        "compared": len(kept),
        "differ": differ + missing,
        "tolerance": f"{EXACT.describe()}: copied tensors, no arithmetic",
    }
    # Then the model: the trained one with LoRA off and the base's own modules (and class count) put back,
    # as PEFT's disable_adapter() does for its modules_to_save.
    # (inside disabled(): it installs the trainer's own originals, whose class convs have B's class count)
    restored = deepcopy(lora)
    x = _images(_data(out, "A"), s)
    with torch.no_grad(), lorakit.disabled(restored):
        for p in fully:
            restored.set_submodule(p, deepcopy(base.get_submodule(p)))
        for attr in ("nc", "no"):
            setattr(restored.model[-1], attr, getattr(base.model[-1], attr))
        restored.names, restored.yaml = dict(base.names), deepcopy(base.yaml)
        outputs = compare_parts(_raw(restored, x), _raw(base, x), {"boxes": EXACT, "scores": EXACT})
        disabled_map = _val_module(restored, _data(out, "A"), s)
    base_map = _val_module(base, _data(out, "A"), s)
    same_out = bool(outputs["ok"])
    checks["disabled_equals_base"] = {
        "ok": same_out and disabled_map == base_map,  # bitwise outputs give the same mAP, exactly
        "outputs_bitwise_equal": same_out,
        "max_abs_diff": outputs["max_abs_diff"],
        "tolerance": f"{EXACT.describe()}: {EXACT.why}; mAP equal",
        "map_a_disabled": disabled_map[0],
        "map50_a_disabled": disabled_map[1],
        "map_a_base": base_map[0],
        "map50_a_base": base_map[1],
    }
    result.update(map_a=disabled_map[0], map50_a=disabled_map[1], base_map_a=base_map[0], base_map50_a=base_map[1])

    # 2. Merged == unmerged (raw outputs of both heads, on B images).
    xb = _images(_data(out, "B"), s)
    merged = lorakit.merge_and_unload(deepcopy(lora)).eval()
    with torch.no_grad():
        y = _raw(lora, xb)
        merge_check = compare_parts(_raw(merged, xb), y, {"boxes": MERGE_TOL, "scores": MERGE_TOL})
        with lorakit.disabled(lora):
            off = _raw(lora, xb)
        effect = max(float((off[k] - y[k]).abs().max()) for k in y)  # how far the adapter moves the outputs
    checks["merged_equals_unmerged"] = {**merge_check, "adapter_effect": effect}

    # 3. ONNX export of the merged model (Ultralytics' exporter), ONNX Runtime vs PyTorch.
    checks["onnx_equals_pytorch"] = _check_onnx(out, merged, xb, s)
    result["onnx_bytes"] = checks["onnx_equals_pytorch"].get("bytes", 0)
    result["checks"] = checks
    return result


def _train_module_paths(model: Any, config: Any) -> list[str]:
    """Paths of the modules ``config.train_modules`` names (trained fully, saved with the adapter)."""
    from ..config import match_pattern

    return [n for n, _ in model.named_modules() if n and any(match_pattern(p, n) for p in config.train_modules)]


def _check_onnx(out: Path, merged: Any, x: Any, s: Settings) -> dict[str, Any]:
    """Export ``merged`` to ONNX (NMS-free raw output, batch 1) and compare ONNX Runtime with PyTorch."""
    from copy import deepcopy

    import numpy as np
    import onnxruntime as ort
    import torch

    yolo = open_yolo(out / "train" / "lora" / "weights" / "best.pt")  # the merged deploy file (fp16) ...
    yolo.model.float().load_state_dict(merged.state_dict())  # ... given the exact fp32 merged weights
    path = Path(yolo.export(format="onnx", imgsz=s.imgsz, batch=1, device="cpu", verbose=False))
    onnx = out / "lora_merged.onnx"
    shutil.move(path, onnx)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # The reference is the model as exported: the default export (nms=None) is the one-to-many head's decoded
    # output, and the exporter fuses Conv+BN first (fusing alone moves pixel coordinates by ~1e-4).
    ref = deepcopy(merged).eval()
    ref.model[-1].end2end = False
    ref = ref.fuse(verbose=False).eval()
    wants, gots = [], []
    with torch.no_grad():
        for i in range(x.shape[0]):
            want = ref(x[i : i + 1])[0]
            got = torch.from_numpy(np.asarray(session.run(None, {name: x[i : i + 1].numpy()})[0]))
            if got.shape != want.shape:
                return {"ok": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
            wants.append(want)
            gots.append(got)
    # (1, 4 + nc, anchors): rows 0-3 are boxes in pixels (xywh), the rest class probabilities
    w, g = torch.cat(wants), torch.cat(gots)
    check = compare_parts({"boxes": g[:, :4], "scores": g[:, 4:]}, {"boxes": w[:, :4], "scores": w[:, 4:]}, ONNX_TOLS)
    return {
        **check,
        "shape": list(gots[0].shape) if gots else None,
        "file": onnx.name,
        "bytes": size(onnx),
    }


def _child(job: str, out: Path, s: Settings) -> int:
    os.environ["OMP_NUM_THREADS"] = "1"
    from . import offline

    offline.enable()  # the parent's switches and config dir, inherited through the environment
    import torch

    torch.set_num_threads(1)
    if job == "pretrain":
        result = _job_pretrain(out, s)
    elif job == "lora":
        result = _job_lora(out, s)
    else:
        result = _job_plain(out, s, job)
    (out / f"{job}.json").write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------
# parent side: stages, table, files
# --------------------------------------------------------------------------------------


def _run_child(job: str, out: Path, s: Settings) -> dict[str, Any]:
    (out / f"{job}.json").unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "lorakit.yolo.demo",
        "--child",
        job,
        "--out",
        str(out),
        "--settings",
        json.dumps(asdict(s)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0 or not (out / f"{job}.json").exists():
        raise RuntimeError(f"demo stage {job!r} failed (exit status {proc.returncode})")
    result: dict[str, Any] = json.loads((out / f"{job}.json").read_text())
    return result


def _rows(res: dict[str, dict[str, Any]], total: int) -> list[dict[str, Any]]:
    rows = []
    for arm in ARMS:
        r = res[arm]
        rows.append(
            {
                "arm": arm,
                "method": TITLES[arm],
                "trainable": r["trainable"],
                "trainable_fraction": r["trainable"] / total,
                "stored": r["stored"],
                "stored_bytes": r["stored_bytes"],
                "epoch_s": r["epoch_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "map50_95_b": r["map_b"],
                "map50_b": r["map50_b"],
                "map50_95_a_restored": r.get("map_a"),
                "map50_a_restored": r.get("map50_a"),
            }
        )
    return rows


def _markdown(rows: list[dict[str, Any]], base: dict[str, Any], checks: dict[str, Any], summary: dict[str, Any]) -> str:
    def opt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        "| method | trainable params | stored per domain | s / epoch | peak RSS | mAP50-95 B | mAP50 B "
        "| mAP50-95 A, adapter off |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        f"| {TITLES['base']} | - | base.pt {fmt_bytes(base['bytes'])} | - | - | - | - | {opt(base['map_a'])} |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} ({r['trainable_fraction']:.1%}) | {r['stored']} "
            f"{fmt_bytes(r['stored_bytes'])} | {r['epoch_s']:.2f} | {r['peak_rss_mib']:.0f} MiB | "
            f"{r['map50_95_b']:.3f} | {r['map50_b']:.3f} | {opt(r['map50_95_a_restored'])} |"
        )
    lines.append("")
    lines.append(
        f"LoRA / full fine-tuning mAP50-95 on B: **{summary['ratio']:.1%}** with {summary['lora_fraction']:.1%} of "
        f"the parameters trainable (target: >= {TARGET_RATIO:.0%} with <= {TARGET_FRACTION:.0%}: "
        f"{'met' if summary['target_met'] else 'not met'})."
    )
    lines.append("")
    lines.append("| check | result | detail |")
    lines.append("|---|---|---|")
    for name, c in checks.items():
        detail = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in c.items()
            if k not in ("ok", "differ") and not k.endswith("_tolerance")  # the *_rule strings state those bounds
        )
        lines.append(f"| {name} | {'PASS' if c['ok'] else 'FAIL'} | {detail} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("mAP50-95 on domain B", [r["map50_95_b"] for r in rows], "{:.3f}"),
        ("trainable parameters (%)", [100 * r["trainable_fraction"] for r in rows], "{:.1f} %"),
        ("stored per domain (MB)", [r["stored_bytes"] / 2**20 for r in rows], "{:.2f}"),
    )
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=["#888888", "#5b8fd9", "#e07b39"])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("yolo26n adapted from synthetic domain A to B (same data, seed and epochs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: Path, s: Settings) -> int:
    """Run the whole demo into ``out``; return the exit status (0: every check passed)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("data", "train", "val", "lora_adapter", "base.pt", "head_weights.safetensors", "lora_merged.onnx"):
        p = out / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    stages = [
        ("data", "synthetic domains A and B"),
        ("pretrain", f"pre-train yolo26n on A ({s.pretrain_epochs} epochs; 0: random weights)"),
        ("full", f"full fine-tuning on B ({s.epochs} epochs)"),
        ("head", f"head-only fine-tuning on B ({s.epochs} epochs)"),
        ("lora", f"LoRA fine-tuning on B ({s.epochs} epochs) + checks + ONNX"),
        ("report", "table, JSON, plot"),
    ]
    bar = tqdm(total=len(stages), desc="lorakit demo", unit="stage", file=sys.stdout, dynamic_ncols=True)
    res: dict[str, dict[str, Any]] = {}
    for i, (job, title) in enumerate(stages, 1):
        bar.set_description(f"[{i}/{len(stages)}] {job}")
        tqdm.write(
            f"\n━━ stage {i}/{len(stages)}: {title}  (elapsed {time.perf_counter() - t_start:.0f} s)", file=sys.stdout
        )
        if job == "data":
            from .data import make_dataset

            for domain, seed in (("A", s.seed), ("B", s.seed + 1)):
                make_dataset(
                    out / "data" / domain, domain=domain, n_train=s.n_train, n_val=s.n_val, imgsz=s.imgsz, seed=seed
                )
        elif job == "pretrain" and s.pretrain_epochs == 0:
            res[job] = _random_base(out)
        elif job != "report":
            res[job] = _run_child(job, out, s)
        bar.update(1)
    bar.close()

    total = _total_params()
    rows = _rows(res, total)
    lora, full = res["lora"], res["full"]
    checks: dict[str, Any] = lora["checks"]
    ratio = lora["map_b"] / full["map_b"] if full["map_b"] > 0 else 0.0
    summary = {
        "ratio": ratio,
        "lora_fraction": lora["trainable"] / total,
        "target_met": ratio >= TARGET_RATIO and lora["trainable"] / total <= TARGET_FRACTION,
        "all_checks_passed": all(c["ok"] for c in checks.values()),
        "wall_s": time.perf_counter() - t_start,
    }
    base = {
        "map_a": lora["base_map_a"],
        "map50_a": lora["base_map50_a"],
        "bytes": size(out / "base.pt"),
        "pretrain_s": res["pretrain"]["seconds"],
    }
    from .trainer import LORA_AUTO_OPTIMIZER

    lora_lr = LORA_AUTO_OPTIMIZER[1]
    text = _markdown(rows, base, checks, summary)
    header = (
        f"# lorakit YOLO demo\n\nyolo26n, {s.n_train} train / {s.n_val} val images of {s.imgsz} px per domain, "
        f"pre-trained {s.pretrain_epochs} epochs on A ({base['pretrain_s']:.0f} s), adapted {s.epochs} epochs "
        f"to B (batch {s.batch}, no warmup, AdamW lr: full {s.lr_full}, head {s.lr_head}, LoRA {lora_lr} = "
        f"LoraYOLO's default, r={lora['r']} on {lora['adapted']} convs + the new class convs, BatchNorm adapting); "
        f"seed {s.seed}; 1 CPU thread per run on {cpu_name()} ({os.cpu_count()} cores); {total:,} parameters at "
        "3 classes. "
        f"Wall time {summary['wall_s']:.0f} s.\n\n"
        "Stored per domain: full fine-tuning needs the whole model (fp16 `.pt` as Ultralytics saves it), head-only "
        "the Detect head, LoRA the adapter folder (fp32 safetensors + JSON). Peak RSS is each child process's "
        'high-water mark after training. "Adapter off" is the trained LoRA model with the adapter disabled and '
        "the modules the adapter trains fully (class convs, BatchNorm) put back from the base; it must score "
        "exactly the base's mAP on A.\n\n"
    )
    (out / "results.md").write_text(header + text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "total_params": total,
                "base": base,
                "rows": rows,
                "checks": checks,
                "summary": summary,
            },
            indent=2,
        )
    )
    _plot(rows, out / "results.png")
    print("\n" + text)
    print(f"wrote {out / 'results.md'}, results.json, results.png; wall time {summary['wall_s']:.0f} s")
    failed = [n for n, c in checks.items() if not c["ok"]]
    if failed:
        print(f"FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _random_base(out: Path) -> dict[str, Any]:
    """``pretrain_epochs=0`` (quick mode): the base is yolo26n with random weights, at domain A's class count."""
    from ultralytics.nn.tasks import DetectionModel

    from .data import DOMAINS

    t0 = time.perf_counter()
    yolo = open_yolo("yolo26n.yaml")
    yolo.model = DetectionModel("yolo26n.yaml", nc=len(DOMAINS["A"]), verbose=False)  # type: ignore[no-untyped-call]
    yolo.save(out / "base.pt")
    return {"seconds": time.perf_counter() - t0}


def _total_params() -> int:
    """Parameters of yolo26n at domain B's class count (built without ultralytics' logging)."""
    from .data import DOMAINS

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo26n.yaml", nc=len(DOMAINS["B"]), verbose=False)  # type: ignore[no-untyped-call]
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.yolo.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds): few images, 1 epoch, 64 px")
    parser.add_argument("--child", choices=("pretrain", *ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings:
        known = {f.name for f in fields(Settings)}
        s = Settings(**{k: v for k, v in json.loads(args.settings).items() if k in known})
    else:
        s = Settings.quick() if args.quick else Settings()
    if args.child:
        return _child(args.child, args.out, s)
    os.environ["OMP_NUM_THREADS"] = "1"
    from . import offline

    # Keep switches that are already on (e.g. a test's private config dir), else a config dir in the output.
    offline.enable(None if offline.is_enabled() else args.out.resolve() / "yolo_config")
    return run(args.out, s)


if __name__ == "__main__":
    sys.exit(main())
