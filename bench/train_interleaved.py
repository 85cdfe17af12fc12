"""Training step, interleaved: the frozen floor, PEFT LoRA and lorakit LoRA in one process.

    python bench/train_interleaved.py                          # llama + minilm, dropout 0 and 0.05
    python bench/train_interleaved.py --models minilm --rounds 6

train_step.py runs every config in its own process, which gives each its own memory
figures; but on this shared machine a process can land in a slow spell, and the same
config's step time moved by up to 15 % from one process to the next. Here the three
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


def _stepper(model_name: str, config: str, dropout: float) -> Any:
    """A function running one training step of a fresh (model, config); returns its seconds."""
    import torch

    model, loss_fn, targets = train_step.build(model_name)
    name = config if config == "frozen_floor" else f"{config}_d{dropout:g}"
    model = train_step.prepare(name, model, targets)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None

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


def run(model_name: str, dropout: float, warmup: int, rounds: int) -> dict[str, Any]:
    steps = {c: _stepper(model_name, c, dropout) for c in CONFIGS}
    for _ in range(warmup):
        for c in CONFIGS:
            steps[c]()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for i in range(rounds):
        for c in CONFIGS if i % 2 == 0 else reversed(CONFIGS):
            times[c].append(steps[c]())
        print(f"  round {i + 1}/{rounds}: " + "  ".join(f"{c} {times[c][-1]:.3f}" for c in CONFIGS), flush=True)

    def ratio(a: str, b: str) -> tuple[float, float, float]:
        return _quartiles([x / y for x, y in zip(times[a], times[b], strict=True)])

    row: dict[str, Any] = {"model": model_name, "dropout": dropout, "rounds": rounds}
    for c in CONFIGS:
        row[f"{c}_s"] = statistics.median(times[c])
    for key, (a, b) in {
        "lorakit_x_floor": ("lorakit", "frozen_floor"),
        "peft_x_floor": ("peft", "frozen_floor"),
        "lorakit_x_peft": ("lorakit", "peft"),
    }.items():
        q1, med, q3 = ratio(a, b)
        row[key], row[key + "_q1"], row[key + "_q3"] = med, q1, q3
    row["times"] = {c: [round(t, 4) for t in times[c]] for c in CONFIGS}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=["llama", "minilm"])
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
            rows.append(run(model_name, dropout, args.warmup, args.rounds))
    for r in rows:
        for key in ("lorakit_x_floor", "peft_x_floor", "lorakit_x_peft"):
            r[key + "_iqr"] = f"{r[key + '_q1']:.3f}-{r[key + '_q3']:.3f}"
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
    ]
    groups = {
        f"{r['model']} d{r['dropout']:g}": {"PEFT": r["peft_x_floor"], "lorakit": r["lorakit_x_floor"]} for r in rows
    }
    title = "Interleaved training step (1 thread)"
    common.report(args.name, args, rows, cols, groups, "step time / frozen floor", title)


if __name__ == "__main__":
    main()
