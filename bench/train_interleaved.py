"""Training step, interleaved: the frozen floor, PEFT LoRA and lorakit LoRA (optionally full
fine-tuning) in one process.

    python bench/train_interleaved.py                          # llama + minilm, dropout 0 and 0.05
    python bench/train_interleaved.py --models minilm --rounds 6
    python bench/train_interleaved.py --models yolo26s --dropouts 0 --configs full_ft frozen_floor lorakit

train_step.py runs every config in its own process, which gives each its own memory
figures; but on this shared machine a process can land in a slow spell, and the same
config's step time moved by up to 15 % from one process to the next. Here the configs'
models are built side by side (same seed, so the same base weights) and each round runs
one training step of each (forward, backward, fused AdamW), in an order that reverses
every round. Ratios are taken within a round, then the median over rounds is reported
with its quartiles: drift of the machine cancels out of them.

Models, batches, targets and LoRA settings are train_step.py's (r=16, alpha=32).
Writes bench/results/train_interleaved.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_step  # noqa: E402

CONFIGS = ("frozen_floor", "peft", "lorakit")
RATIOS = {  # reported when both configs ran
    "lorakit_x_floor": ("lorakit", "frozen_floor"),
    "peft_x_floor": ("peft", "frozen_floor"),
    "lorakit_x_peft": ("lorakit", "peft"),
    "lorakit_x_full": ("lorakit", "full_ft"),
}


def _stepper(model_name: str, config: str, dropout: float) -> Any:
    """A function running one training step of a fresh (model, config); returns its seconds."""
    model, loss_fn, targets = train_step.build(model_name)
    name = config if config in ("frozen_floor", "full_ft") else f"{config}_d{dropout:g}"
    _, opt = train_step.for_training(train_step.prepare(name, model, targets))

    def step() -> float:
        t0 = time.perf_counter()
        loss_fn().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return q1, med, q3


def run(model_name: str, dropout: float, configs: list[str], warmup: int, rounds: int) -> dict[str, Any]:
    steps = {c: _stepper(model_name, c, dropout) for c in configs}
    for _ in range(warmup):
        for c in configs:
            steps[c]()
    times: dict[str, list[float]] = {c: [] for c in configs}
    for i in range(rounds):
        for c in configs if i % 2 == 0 else reversed(configs):
            times[c].append(steps[c]())
        print(f"  round {i + 1}/{rounds}: " + "  ".join(f"{c} {times[c][-1]:.3f}" for c in configs), flush=True)

    row: dict[str, Any] = {"model": model_name, "dropout": dropout, "rounds": rounds}
    for c in configs:
        row[f"{c}_s"] = statistics.median(times[c])
    for key, (a, b) in RATIOS.items():
        if a in times and b in times:
            q1, med, q3 = _quartiles([x / y for x, y in zip(times[a], times[b], strict=True)])
            row[key], row[key + "_q1"], row[key + "_q3"] = med, q1, q3
            row[key + "_iqr"] = f"{q1:.3f}-{q3:.3f}"
    row["times"] = {c: [round(t, 4) for t in times[c]] for c in configs}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=train_step.MODELS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=["full_ft", *CONFIGS])
    ap.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.05])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--name", default="train_interleaved", help="results file stem")
    args = ap.parse_args()
    common.one_thread()
    rows = []
    for model_name in args.models:
        for dropout in args.dropouts:
            print(f"[{model_name} dropout {dropout:g}]", flush=True)
            rows.append(run(model_name, dropout, args.configs, args.warmup, args.rounds))
    cols = [
        ("model", "model", ""),
        ("dropout", "dropout", "g"),
        ("frozen_floor_s", "floor s", ".3f"),
        ("peft_s", "PEFT s", ".3f"),
        ("lorakit_s", "lorakit s", ".3f"),
        ("lorakit_x_floor", "lorakit x floor", ".3f"),
        ("lorakit_x_floor_iqr", "(quartiles)", ""),
        ("peft_x_floor", "PEFT x floor", ".3f"),
        ("lorakit_x_peft", "lorakit x PEFT", ".3f"),
        ("lorakit_x_peft_iqr", "(quartiles)", ""),
        ("full_ft_s", "full FT s", ".3f"),
        ("lorakit_x_full", "lorakit x full", ".3f"),
        ("lorakit_x_full_iqr", "(quartiles)", ""),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    groups = {
        f"{r['model']} d{r['dropout']:g}": {
            k: r[key] for k, key in (("PEFT", "peft_x_floor"), ("lorakit", "lorakit_x_floor")) if key in r
        }
        for r in rows
    }
    title = "Interleaved training step (1 thread)"
    common.report(args.name, args, rows, cols, groups, "step time / frozen floor", title)


if __name__ == "__main__":
    main()
