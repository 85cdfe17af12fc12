"""Forward benchmark: bare model, lorakit unmerged, lorakit merged, PEFT unmerged.

    python bench/forward.py [--models llama minilm] [--rounds 20]

All variants live in one process and are timed interleaved, round-robin, with
the order reversed every other round (3 warm-up rounds), at the training shape
and at batch 1 x 64 tokens, so machine noise hits them alike. Adapters use
random B (not a no-op), so "merged equals unmerged" is a real check; the max
|difference| is reported. Writes bench/results/forward.json and forward.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_step import build  # noqa: E402

SHAPES = {"llama": [(4, 256), (1, 64)], "minilm": [(16, 128), (1, 64)]}


def run(model_name: str, rounds: int) -> list[dict[str, Any]]:
    import peft
    import torch

    import lorakit

    base, _, targets = build(model_name)
    base.eval()
    variants: dict[str, Any] = {"bare": base}
    unmerged = copy.deepcopy(base)
    lorakit.inject(unmerged, lorakit.LoraConfig(r=16, alpha=32, targets=["re:" + targets[0]], init="random"))
    merged = copy.deepcopy(unmerged)
    lorakit.merge(merged)
    variants["lorakit_unmerged"] = unmerged
    variants["lorakit_merged"] = merged
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets[0], init_lora_weights=False)
    )
    variants["peft_unmerged"] = pm.eval()
    rows = []
    vocab = base.config.vocab_size
    for b, s in SHAPES[model_name]:
        torch.manual_seed(1)
        ids = torch.randint(1000, vocab, (b, s))

        def call(m: Any, ids: Any = ids) -> Any:
            out = m(input_ids=ids)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

        with torch.no_grad():
            ref = call(unmerged)
            diff = float((call(merged) - ref).abs().max())
            times: dict[str, list[float]] = {k: [] for k in variants}
            for rnd in range(rounds + 3):
                order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
                for k in order:
                    t0 = time.perf_counter()
                    call(variants[k])
                    if rnd >= 3:
                        times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            rows.append(
                {
                    "model": model_name,
                    "shape": f"{b}x{s}",
                    "variant": k,
                    "seconds": v,
                    "x_bare": v / med["bare"],
                    "merged_vs_unmerged_max_abs": diff if k == "lorakit_merged" else None,
                }
            )
        print(f"[{model_name} {b}x{s}] " + "  ".join(f"{k} {v:.4f}s (x{v / med['bare']:.3f})" for k, v in med.items()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    common.one_thread()
    rows = [r for m in args.models for r in run(m, args.rounds)]
    common.report(
        "forward",
        args,
        rows,
        [
            ("model", "model", ""),
            ("shape", "batch x seq", ""),
            ("variant", "variant", ""),
            ("seconds", "median s", ".4f"),
            ("x_bare", "x bare", ".3f"),
            ("merged_vs_unmerged_max_abs", "max abs diff vs unmerged", ".1e"),
        ],
        {
            f"{m} {s}": {r["variant"]: r["x_bare"] for r in rows if r["model"] == m and r["shape"] == s}
            for m, s in dict.fromkeys((r["model"], r["shape"]) for r in rows)
        },
        "forward time / bare model",
        "Forward pass vs the bare model (1 thread)",
    )


if __name__ == "__main__":
    main()
