"""Where a YOLO training run spends its time: LoRA vs full fine-tuning, phase by phase, in Ultralytics' own trainer.

    python bench/yolo_train_profile.py                              # yolo26n at imgsz 160 and 640
    python bench/yolo_train_profile.py --models yolo26n yolo26s --sizes 160 --epochs 10 --repeats 2
    python bench/yolo_train_profile.py --sizes 160 --before /tmp/old/src   # + LoRA on older code, interleaved
    python bench/yolo_train_profile.py --arms full lora                    # leave out full_fast

Both arms fine-tune the same base (the model's YAML with random weights, 80 classes,
saved once as a ``.pt``) on the project's synthetic detection data (domain B, 3
classes, so the class convs are re-initialised in both arms), with the same
Ultralytics arguments: AdamW, batch 16 at imgsz 160 (8 at 640), ``nbs`` = batch (an
optimizer step per batch), no warm-up, validation after every epoch, ``workers=0``,
one thread. Full fine-tuning (``full``) is the stock ``DetectionTrainer`` at lr 0.001;
``full_fast`` is the same on lorakit's trainer speed-ups (channels-last on an x86 CPU, the
setup's heap frozen for the garbage collector: :mod:`lorakit.yolo.speed`, which a LoRA run
has too), so what LoRA saves and what the trainer saves can be told apart; LoRA is
:class:`lorakit.yolo.LoraYOLO` with its defaults. Each run is a fresh child interpreter;
arms alternate (full, full_fast, LoRA, full, ...) so slow drifts of a shared machine hit all.

Phases of each epoch, timed inside the trainer by wrapping its own methods:

==============  ====================================================================
data            waiting for the next batch (the loader's ``__next__``) and
                ``preprocess_batch`` (to float, /255)
forward         ``model(batch)``: the forward pass and the loss
backward        ``loss.backward()``
optimizer       ``optimizer_step`` less the EMA: unscale, gradient clipping, step, zero_grad
EMA             ``ema.update``
validation      ``validate()`` on the EMA model
checkpoint      ``save_model()``: ``last.pt``/``best.pt`` (and for LoRA the adapter,
                the merged copy and the resume state)
other           the rest of the epoch (scheduler, logging, callbacks)
==============  ====================================================================

Reported per phase: the median seconds per epoch (first epoch left out: caching and
warm-up), wall-clock and CPU time (see :class:`Phases`), and the ratios LoRA / full
and LoRA / full_fast.
``wall`` is the whole ``train()`` call including setup and the final validation of
``best.pt``. Writes
``bench/results/yolo_train_profile.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ratio name -> (numerator arm, denominator arm), reported when both ran
RATIOS = {"ratio": ("lora", "full"), "ratio_fast": ("lora", "full_fast"), "before ratio": ("before", "full")}
PHASES = ["data", "forward", "backward", "optimizer", "EMA", "validation", "checkpoint", "other"]
# "before": LoRA with lorakit imported from --before (an older checkout's src)
ARMS = ["full", "full_fast", "lora", "before"]


class Phases:
    """Seconds per phase per epoch, filled by wrappers around the trainer's own methods.

    Each phase is timed twice: wall-clock (``perf_counter``) and this process's CPU time
    (``process_time``). Training runs on one thread, so CPU time is the compute itself and
    barely moves when other processes share the machine; wall time also counts waiting
    (file syncs, and being descheduled on a busy machine).
    """

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.epoch_t0 = (0.0, 0.0)
        self.setup = 0.0
        self.final_eval = 0.0
        self.final_eval_cpu = 0.0
        self.in_final_eval = False  # Ultralytics' final_eval runs on_fit_epoch_end once more: not an epoch

    def add(self, phase: str, wall: float, cpu: float) -> None:
        self.cur[phase] = self.cur.get(phase, 0.0) + wall
        self.cur[f"{phase} cpu"] = self.cur.get(f"{phase} cpu", 0.0) + cpu

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed into ``phase``; a nested call (``DetectionModel.loss`` calls ``self.forward``) counts once."""
        depth = [0]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    self.add(phase, time.perf_counter() - t0, time.process_time() - c0)

        return wrapper

    def epoch_start(self, trainer: Any) -> None:
        self.cur = {}
        self.epoch_t0 = (time.perf_counter(), time.process_time())

    def epoch_end(self, trainer: Any) -> None:
        if self.in_final_eval:
            return
        wall, cpu = time.perf_counter() - self.epoch_t0[0], time.process_time() - self.epoch_t0[1]
        cur: dict[str, float] = {}
        for suffix, total in (("", wall), (" cpu", cpu)):
            part = {p + suffix: self.cur.get(p + suffix, 0.0) for p in PHASES if p != "other"}
            part["optimizer" + suffix] -= part["EMA" + suffix]  # optimizer_step's time includes the EMA update
            part["other" + suffix] = total - sum(part.values())
            part["epoch" + suffix] = total
            cur |= part
        self.epochs.append(cur)


def _instrument(model: Any, ph: Phases) -> None:
    """Wrap the trainer's methods once it has built everything (``on_pretrain_routine_end``)."""
    import torch

    backward = torch.Tensor.backward

    def timed_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return backward(self, *args, **kwargs)
        finally:
            ph.add("backward", time.perf_counter() - t0, time.process_time() - c0)

    def wrap(trainer: Any) -> None:
        torch.Tensor.backward = timed_backward  # type: ignore[method-assign]
        trainer.model.forward = ph.timed("forward", trainer.model.forward)
        trainer.preprocess_batch = ph.timed("data", trainer.preprocess_batch)
        trainer.optimizer_step = ph.timed("optimizer", trainer.optimizer_step)
        trainer.ema.update = ph.timed("EMA", trainer.ema.update)
        trainer.validate = ph.timed("validation", trainer.validate)
        trainer.save_model = ph.timed("checkpoint", trainer.save_model)
        trainer.final_eval = _final(trainer.final_eval, ph)
        loader = trainer.train_loader
        it = type(loader).__iter__

        class TimedLoader(type(loader)):  # type: ignore[misc]
            def __iter__(self) -> Any:
                inner = it(self)
                while True:
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        batch = next(inner)
                    except StopIteration:
                        ph.add("data", time.perf_counter() - t0, time.process_time() - c0)
                        return
                    ph.add("data", time.perf_counter() - t0, time.process_time() - c0)
                    yield batch

        loader.__class__ = TimedLoader
        ph.setup = time.perf_counter() - ph.setup

    model.add_callback("on_pretrain_routine_end", wrap)
    model.add_callback("on_train_epoch_start", ph.epoch_start)
    model.add_callback("on_fit_epoch_end", ph.epoch_end)


def _final(fn: Callable[[], Any], ph: Phases) -> Callable[[], Any]:
    def wrapper() -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        ph.in_final_eval = True
        try:
            return fn()
        finally:
            ph.final_eval, ph.final_eval_cpu = time.perf_counter() - t0, time.process_time() - c0
            ph.in_final_eval = False

    return wrapper


def _base(work: Path, model_name: str) -> Path:
    """``<model>.yaml`` with random weights as a checkpoint (what a user's ``<model>.pt`` is, minus training)."""
    base = work / f"{model_name}-base.pt"
    if not base.exists():
        from ultralytics import YOLO

        YOLO(f"{model_name}.yaml").save(str(base))
    return base


def _data(work: Path, imgsz: int, n_train: int, n_val: int) -> Path:
    from lorakit.yolo.data import make_dataset

    root = work / f"data-B-{imgsz}-{n_train}"
    yaml = root / "data.yaml"
    if not yaml.exists():
        make_dataset(root, domain="B", n_train=n_train, n_val=n_val, imgsz=imgsz, seed=1)
    return yaml


def child(arm: str, model_name: str, imgsz: int, epochs: int, work: Path) -> dict[str, Any]:
    common.one_thread()
    from lorakit.yolo import offline

    offline.enable(work / "yolo_config")
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    batch = 16 if imgsz <= 320 else 8
    n_train, n_val = (64, 32) if imgsz <= 320 else (16, 8)
    data = _data(work, imgsz, n_train, n_val)
    base = _base(work, model_name)
    args: dict[str, Any] = {
        "data": str(data),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "nbs": batch,
        "warmup_epochs": 0,
        "workers": 0,
        "plots": False,
        "device": "cpu",
        "seed": 0,
        "deterministic": False,
        "val": True,
        "project": str(work / "runs"),
        "name": f"{model_name}-{imgsz}-{arm}",
        "exist_ok": True,
        "verbose": False,
    }
    model = YOLO(str(base)) if arm.startswith("full") else LoraYOLO(str(base))
    if arm.startswith("full"):
        args |= {"optimizer": "AdamW", "lr0": 0.001}
    if arm == "full_fast":
        from ultralytics.models.yolo.detect import DetectionTrainer

        from lorakit.yolo.speed import with_speedups

        args["trainer"] = with_speedups(DetectionTrainer)
    ph = Phases()
    _instrument(model, ph)
    t0, c0 = time.perf_counter(), time.process_time()
    ph.setup = t0
    model.train(**args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = getattr(model.trainer, "metrics", {}) or {}
    trainable = sum(p.numel() for g in model.trainer.optimizer.param_groups for p in g["params"])
    return {
        "arm": arm,
        "model": model_name,
        "imgsz": imgsz,
        "epochs_run": len(ph.epochs),
        "wall": wall,
        "wall cpu": cpu,
        "setup": ph.setup,
        "final_eval": ph.final_eval,
        "final_eval cpu": ph.final_eval_cpu,
        "per_epoch": ph.epochs,
        "map50_95": float(metrics.get("metrics/mAP50-95(B)", float("nan"))),
        "trainable": trainable,
        "peak_rss_mib": common.peak_rss_mib(),
        "lorakit": str(Path(sys.modules["lorakit"].__file__ or "").parent),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    """Median over every run's epochs after the first (over all epochs if there is only one)."""
    vals = [e[key] for r in runs for e in (r["per_epoch"][1:] or r["per_epoch"])]
    return statistics.median(vals) if vals else float("nan")


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    keys = sorted({(r["model"], r["imgsz"]) for r in runs})
    for model_name, imgsz in keys:
        by_arm = {a: [r for r in runs if (r["model"], r["imgsz"], r["arm"]) == (model_name, imgsz, a)] for a in ARMS}
        arms = [a for a in ARMS if by_arm[a]]
        for phase in [*PHASES, "epoch", "wall", "final_eval", "map50_95"]:
            row: dict[str, Any] = {"model": model_name, "imgsz": imgsz, "phase": phase}
            for a in arms:
                for suffix, col in (("", a), (" cpu", f"{a} cpu")):
                    if phase == "map50_95" and suffix:
                        continue
                    if phase in ("wall", "final_eval", "map50_95"):
                        vals = [r[phase + suffix] for r in by_arm[a]]
                        row[col] = statistics.median(vals) if vals else float("nan")
                    else:
                        row[col] = _median(by_arm[a], phase + suffix)
            for name, (num, den) in RATIOS.items():
                if num in arms and den in arms:
                    for suffix in ("", " cpu"):
                        if num + suffix in row:
                            den_value = row[den + suffix]
                            row[name + suffix] = row[num + suffix] / den_value if den_value else float("nan")
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help="folder for data, base models and runs (default: a temporary one)")
    ap.add_argument("--models", nargs="+", default=["yolo26n"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[160, 640])
    ap.add_argument("--epochs", type=int, default=0, help="epochs per run (default: 8 at imgsz <= 320, 3 above)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per arm (alternating)")
    ap.add_argument("--name", default="yolo_train_profile")
    ap.add_argument("--arms", nargs="+", default=ARMS[:3], choices=ARMS[:3], help="arms besides --before")
    ap.add_argument(
        "--before",
        help="a lorakit src folder (e.g. `git archive <commit> src | tar -x -C /tmp/old`, then /tmp/old/src): "
        "adds a third arm, LoRA on that code, interleaved with the other two (before/after on one machine state)",
    )
    args = ap.parse_args()
    if args.child:
        model_name, imgsz = args.models[0], args.sizes[0]
        print(json.dumps(child(args.arm, model_name, imgsz, args.epochs, Path(args.work))))
        return 0
    with tempfile.TemporaryDirectory(prefix="lorakit-yolo-profile-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs: list[dict[str, Any]] = []
        pythonpath = os.environ.get("PYTHONPATH", "")
        for model_name in args.models:
            for imgsz in args.sizes:
                epochs = args.epochs or (8 if imgsz <= 320 else 3)
                for rep in range(args.repeats):
                    for arm in [*args.arms, *(["before"] if args.before else [])]:
                        if arm == "before":  # the child imports lorakit from there instead
                            os.environ["PYTHONPATH"] = os.pathsep.join([args.before, pythonpath])
                        else:
                            os.environ["PYTHONPATH"] = pythonpath
                        res = common.run_child(
                            Path(__file__),
                            ["--arm", arm, "--models", model_name, "--sizes", str(imgsz), "--epochs", str(epochs)]
                            + ["--work", str(work)],
                            timeout=7200,
                        )
                        runs.append(res)
                        print(
                            f"{model_name} imgsz {imgsz} {arm} #{rep + 1}: wall {res['wall']:.1f} s, "
                            f"mAP50-95 {res['map50_95']:.4f}, foreign load {res['foreign_load']}",
                            flush=True,
                        )
    rows = summarise(runs)
    cols = [
        ("model", "model", ""),
        ("imgsz", "imgsz", ""),
        ("phase", "phase (s per epoch; wall: whole run)", ""),
        ("full", "full: wall", ".3f"),
        ("lora", "LoRA: wall", ".3f"),
        ("ratio", "LoRA / full: wall", ".2f"),
        ("full cpu", "full: CPU", ".3f"),
        ("full_fast cpu", "full_fast: CPU", ".3f"),
        ("lora cpu", "LoRA: CPU", ".3f"),
        ("ratio cpu", "LoRA / full: CPU", ".2f"),
        ("ratio_fast cpu", "LoRA / full_fast: CPU", ".2f"),
        ("before cpu", "LoRA before: CPU", ".3f"),
        ("before ratio cpu", "LoRA before / full: CPU", ".2f"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    text = common.table(rows, cols)
    print("\n" + text)
    path = common.write_json(args.name, {"machine": common.machine(), "args": vars(args), "rows": rows, "runs": runs})
    groups = {
        f"{r['model']}@{r['imgsz']} {r['phase']}": {a: r[f"{a} cpu"] for a in ARMS if f"{a} cpu" in r}
        for r in rows
        if r["phase"] in PHASES
    }
    plot = common.bar_plot(args.name, groups, "CPU seconds per epoch (median)", "YOLO training phases: full vs LoRA")
    print(f"\nwrote {path}" + (f" and {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
