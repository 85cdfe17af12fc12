"""QLoRA step time, lorakit vs PEFT, timed alternately in one process on the same NF4 weights.

    python bench/qlora_time.py [--size 1b] [--layers 2] [--rounds 4]

``bench/qlora.py`` runs each case in its own process (peak memory needs that) and times them
one after the other, so on a shared machine a change of load between the two processes reads
as a difference between the libraries: at 1B one timed NF4 step read 1.52x PEFT's. Here both
models live in one process, built from the same saved LLaMA-style checkpoint with the same
quantisation (NF4, double quantisation, bf16 compute) and the same LoRA (r=16, alpha=32, every
projection, adapters in bf16 in both: PEFT's are cast, as in ``bench/qlora.py``), and their
training steps (forward, backward, AdamW step) alternate, the order flipped every round, so
the load hits both alike. The time is the process's CPU time per step (``time.process_time``):
what another process takes from the machine does not count. One thread.

``--layers`` keeps the preset's widths (hidden, intermediate, vocabulary) with fewer decoder
layers: a layer's cost is the same at any depth, and a 1B NF4 step takes minutes on a CPU.

Target (issue 16): lorakit's step time at most PEFT's on the same quantised model; the median
of the per-round ratios is the figure. Writes bench/results/qlora_time.json.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the preset's widths)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (each: one step per library)")
    ap.add_argument("--out", default="qlora_time", help="results/<out>.json")
    args = ap.parse_args()
    common.one_thread()
    warnings.filterwarnings("ignore")
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
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        models = {lib: build(folder, lib) for lib in ("lorakit", "peft")}
    opts = {
        lib: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for lib, m in models.items()
    }
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {lib: [] for lib in models}
    losses: dict[str, list[float]] = {lib: [] for lib in models}
    print(f"NF4 LLaMA-style, {args.size} widths, {args.layers} layers, {args.batch} x {args.seq} tokens")
    for rnd in range(1 + args.rounds):  # round 0 warms up
        order = list(models) if rnd % 2 == 0 else list(reversed(list(models)))
        for lib in order:
            t0 = time.process_time()
            loss = models[lib](input_ids=ids, labels=ids).loss
            loss.backward()
            opts[lib].step()
            opts[lib].zero_grad(set_to_none=True)
            if rnd:
                times[lib].append(time.process_time() - t0)
            losses[lib].append(float(loss))
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{lib} {times[lib][-1]:.2f} s" for lib in models), flush=True)
    ratios = [a / b for a, b in zip(times["lorakit"], times["peft"], strict=True)]
    result = {
        "machine": common.machine(),
        "size": args.size,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "step_cpu_s": {lib: [round(t, 3) for t in ts] for lib, ts in times.items()},
        "losses": {lib: [round(v, 5) for v in vs] for lib, vs in losses.items()},
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_of_minimums": round(min(times["lorakit"]) / min(times["peft"]), 3),
        "check_lorakit_time_le_peft": statistics.median(ratios) <= 1.0,
    }
    print(
        f"lorakit / PEFT step CPU time: median of rounds {result['ratio_median']}, "
        f"of fastest steps {result['ratio_of_minimums']}; losses lorakit {result['losses']['lorakit']}, "
        f"PEFT {result['losses']['peft']}"
    )
    common.write_json(args.out, result)


if __name__ == "__main__":
    main()
