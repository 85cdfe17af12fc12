"""2-process DDP and FSDP2 scaling of ``lorakit hf train`` on this machine's CPUs (gloo, torchrun).

    python bench/hf_ddp.py [--quick]

A LLaMA-style model built from a config (hidden 256, 4 layers, 8 heads; word-level tokenizer,
no download), LoRA r=16 on the default targets, 256 prompt/response records, global batch 16,
max_len 64, fp32, dropout 0. Runs, each a fresh ``lorakit hf train`` under ``torchrun``:

    1 process  x 1 thread     the baseline
    1 process  x 2 threads    the same cores used by intra-op threads instead
    2 processes x 1 thread    DDP, batch 8 per process (same global batch)
    2 processes x 1 thread    FSDP2 (fsdp=True): the same, with the model sharded across the two
                              (each block's weights gathered for its forward and backward: more
                              communication than DDP, for half the memory per process)

Reported: training seconds (``metrics.json``: ``Trainer.train`` only, not the start-up),
samples/s, speed-up over the baseline, and the largest relative difference of each loss
curve from the baseline's. Writes bench/results/hf_ddp.json, with the load average before and
after: numbers from a shared 2-core machine are noisy, other work on it shows up as lost speed-up
(and 2 threads on 2 busy cores can be far slower than 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def build(root: Path) -> Path:
    import torch
    import transformers
    from tests.hf.conftest import _tokenizer

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                   intermediate_size=688, vocab_size=len(tok), max_position_embeddings=128,
                                   bos_token_id=2, eos_token_id=2, pad_token_id=0)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def records(n: int) -> list[dict[str, str]]:
    import random

    from tests.hf.conftest import WORDS

    rnd = random.Random(0)
    out = []
    for _ in range(n):
        words = rnd.choices(WORDS[:30], k=rnd.randint(4, 12))
        out.append({"prompt": "repeat " + " ".join(words) + " :", "response": " ".join(words)})
    return out


def main() -> None:
    from tests.hf.ddp import torchrun
    from tests.hf.runs import write_jsonl

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 records, 1 epoch")
    a = ap.parse_args()
    n, epochs = (64, 1) if a.quick else (256, 2)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(root)
        data = write_jsonl(root / "d.jsonl", records(n))
        common_args = [f"model={model}", f"data={data}", "r=16", f"epochs={epochs}", "lr=1e-3", "dropout=0.0",
                       "max_len=64", "eval_fraction=0.0", "progress=False", "device=cpu"]  # fmt: skip
        for name, nproc, threads, batch, fsdp in (
            ("1 process x 1 thread", 1, 1, 16, False), ("1 process x 2 threads", 1, 2, 16, False),
            ("2 processes x 1 thread (DDP)", 2, 1, 8, False), ("2 processes x 1 thread (FSDP2)", 2, 1, 8, True),
        ):  # fmt: skip
            out = root / f"out-{nproc}-{threads}-{'fsdp' if fsdp else 'ddp'}"
            run = [*common_args, f"out={out}", f"batch_size={batch}", f"fsdp={fsdp}"]
            done = torchrun(nproc, run, timeout=1800, threads=threads)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            m = json.loads((out / "metrics.json").read_text())
            ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
            curves[name] = json.loads((ckpt / "state.json").read_text())["losses"]
            rate = n * epochs / m["seconds"]
            rows.append({"run": name, "processes": nproc, "threads": threads, "batch_per_process": batch,
                         "steps": m["steps"], "seconds": m["seconds"], "samples_per_s": rate})  # fmt: skip
    base = rows[0]
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        c, b = curves[r["run"]], curves[base["run"]]
        r["loss_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(c, b, strict=True))
    print(common.table(rows, [("run", "run", "s"), ("steps", "steps", "d"), ("seconds", "train s", ".1f"),
                              ("samples_per_s", "samples/s", ".1f"), ("speedup", "speed-up", ".2f"),
                              ("loss_max_rel_diff", "loss vs baseline (max rel)", ".1e")]))  # fmt: skip
    note = "shared 2-core CPU machine; load_average: os.getloadavg() before and after (other work on the cores)"
    path = common.write_json("hf_ddp", {"machine": common.machine(), "examples": n, "epochs": epochs,
                                        "global_batch": 16, "rows": rows, "note": note,
                                        "load_average": [load_before, os.getloadavg()]})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
