"""QLoRA step time, lorakit vs PEFT, on the same NF4 weights, as CPU time per training step.

    python bench/qlora_time.py [--size 1b] [--layers 2] [--seq 128] [--pairs 6] [--steps 8]
    python bench/qlora_time.py --one-process --rounds 20      # both models in one process

Both libraries train the same saved LLaMA-style checkpoint with the same quantisation (NF4,
double quantisation, bf16 compute) and the same LoRA (r=16, alpha=32, every projection,
adapters in bf16 in both: PEFT's are cast, as in ``bench/qlora.py``). A step is forward,
backward and an AdamW step; its time is the process's CPU time (``time.process_time``, user
plus system), so what other processes take from a shared machine does not count, while the
page faults a step causes do.

Default: each library in its own fresh interpreter, as a user runs it, ``--pairs`` times,
the order flipped every pair (lorakit, PEFT, PEFT, lorakit, ...). Each child warms up with
two steps, then times ``--steps``; its median is one sample. The figure is the median of
the per-pair ratios lorakit / PEFT.

``--one-process`` builds both models in one interpreter and alternates their steps. That
cancels load drift best, but the two models then share one glibc heap, and how often a
step's large transients (each 4-bit layer's weight dequantised in the backward: 23 MB at
1B widths) land on fresh pages depends on what the other model left there: in that mode
lorakit's steps took more page faults than PEFT's (45k against 31k per step at 1B widths,
seq 128) with the same dispatched operations, and the user CPU time was equal. The
per-step minor page faults are reported in both modes.

``--layers`` keeps the preset's widths (hidden, intermediate, vocabulary) with fewer decoder
layers: a layer's cost is the same at any depth.

Target (issue 16): lorakit's step time at most PEFT's on the same quantised model.
Writes bench/results/qlora_time.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from qlora import SIZES, TARGETS  # noqa: E402

LIBS = ("lorakit", "peft")


def build(folder: str, lib: str) -> Any:
    """The NF4 model of ``folder`` with LoRA from ``lib``, in train mode."""
    import peft
    import torch

    import lorakit
    from lorakit.hf import load_quantized

    model = load_quantized(folder, "nf4", compute_dtype="bfloat16", double_quant=True, device="cpu")
    torch.manual_seed(1)
    if lib == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS))
    else:
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT keeps them fp32 on a 4-bit base; lorakit's are in the compute dtype
                p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


class Trainee:
    """One library's model, optimizer and batch; :meth:`step` returns (CPU seconds, minor faults, loss)."""

    def __init__(self, folder: str, lib: str, vocab: int, batch: int, seq: int) -> None:
        import torch

        self.model = build(folder, lib)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(self) -> tuple[float, int, float]:
        faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.process_time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, float(loss)


def save_base(args: argparse.Namespace, folder: str) -> int:
    """Save the LLaMA-style checkpoint of ``args`` into ``folder``; its vocabulary size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, _, inter, heads, vocab = SIZES[args.size]
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return vocab


def child(args: argparse.Namespace) -> None:
    """One library in this process: two warm-up steps, then ``--steps`` timed."""
    trainee = Trainee(args.folder, args.lib, args.vocab, args.batch, args.seq)
    for _ in range(2):
        trainee.step()
    samples = [trainee.step() for _ in range(args.steps)]
    print(
        json.dumps(
            {
                "cpu_s": statistics.median(s[0] for s in samples),
                "faults": statistics.median(s[1] for s in samples),
                "losses": [round(s[2], 5) for s in samples],
            }
        )
    )


def processes(args: argparse.Namespace) -> dict[str, Any]:
    """Each library in its own interpreter, ``args.pairs`` times, the order flipped every pair."""
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in LIBS}
    with tempfile.TemporaryDirectory() as folder:
        vocab = save_base(args, folder)
        for pair in range(args.pairs):
            for lib in LIBS if pair % 2 == 0 else tuple(reversed(LIBS)):
                shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
                run = common.run_child(
                    Path(__file__), ["--lib", lib, "--folder", folder, "--vocab", str(vocab), *shape]
                )
                runs[lib].append(run)
            print(f"pair {pair + 1}: " + ", ".join(f"{lib} {runs[lib][-1]['cpu_s']:.3f} s" for lib in LIBS), flush=True)
    return {
        "step_cpu_s": {lib: [round(r["cpu_s"], 4) for r in rs] for lib, rs in runs.items()},
        "faults_per_step": {lib: [r["faults"] for r in rs] for lib, rs in runs.items()},
        "foreign_load": {lib: [r["foreign_load"] for r in rs] for lib, rs in runs.items()},
        "losses": {lib: rs[0]["losses"] for lib, rs in runs.items()},
    }


def one_process(args: argparse.Namespace) -> dict[str, Any]:
    """Both models in this interpreter, steps alternating, the order flipped every round."""
    with tempfile.TemporaryDirectory() as folder:
        vocab = save_base(args, folder)
        trainees = {lib: Trainee(folder, lib, vocab, args.batch, args.seq) for lib in LIBS}
    samples: dict[str, list[tuple[float, int, float]]] = {lib: [] for lib in LIBS}
    for rnd in range(2 + args.rounds):  # two warm-up rounds
        for lib in LIBS if rnd % 2 == 0 else tuple(reversed(LIBS)):
            s = trainees[lib].step()
            if rnd >= 2:
                samples[lib].append(s)
    return {
        "step_cpu_s": {lib: [round(s[0], 4) for s in ss] for lib, ss in samples.items()},
        "faults_per_step": {lib: [s[1] for s in ss] for lib, ss in samples.items()},
        "losses": {lib: [round(s[2], 5) for s in ss] for lib, ss in samples.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the preset's widths)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=6, help="processes per library (default mode)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (default mode)")
    ap.add_argument("--one-process", action="store_true", help="both models in one process, steps alternating")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (--one-process)")
    ap.add_argument("--out", default="qlora_time", help="results/<out>.json")
    args = ap.parse_args()
    common.one_thread()
    warnings.filterwarnings("ignore")
    if args.child:
        child(args)
        return
    mode = "one-process" if args.one_process else "processes"
    print(f"NF4 LLaMA-style, {args.size} widths, {args.layers} layers, {args.batch} x {args.seq} tokens, {mode}")
    found = one_process(args) if args.one_process else processes(args)
    times = found["step_cpu_s"]
    ratios = [a / b for a, b in zip(times["lorakit"], times["peft"], strict=True)]
    result = {
        "machine": common.machine(),
        "mode": mode,
        **{k: getattr(args, k) for k in ("size", "layers", "batch", "seq", "pairs", "steps", "rounds")},
        **found,
        "ratio_per_sample": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
        "faults_median": {lib: statistics.median(f) for lib, f in found["faults_per_step"].items()},
        "check_lorakit_time_le_peft": statistics.median(ratios) <= 1.0,
    }
    print(
        f"lorakit / PEFT step CPU time: median {result['ratio_median']} (quartiles {result['ratio_quartiles']}); "
        f"minor faults per step {result['faults_median']}"
    )
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
