"""QLoRA benchmark: one LoRA training step on an fp32, a bf16 and an NF4 base, lorakit and PEFT side by side.

    python bench/qlora.py [--size 1b | --hidden 768 --layers 8 --inter 2048 --vocab 16000] [--quick]

A LLaMA-style model is built from its config (random weights, no download) and saved once;
each of the six cases (base x library) then runs in a fresh child interpreter with one
thread: load the base (fp32, bf16, or NF4 with double quantisation and bf16 compute, via
``lorakit.hf.load_quantized``; PEFT gets the very same loaded model), add LoRA r=16 on every
projection, and take ``1 + steps`` AdamW steps on fixed random tokens. Both libraries keep
the adapters in the base's dtype (its compute dtype for NF4), so both do the same arithmetic:
PEFT is given ``autocast_adapter_dtype=False`` and, on NF4, its adapters are cast to bf16
(it keeps them fp32 on a 4-bit base otherwise; ``--peft-fp32-adapters`` leaves them so).

Memory: peak resident set size (VmHWM) during the training steps, minus the RSS the child
had after its imports (torch, transformers, bitsandbytes, peft: the same ~0.5 GB in every
case, which quantisation does not touch). The kernel's peak is reset after loading
(``/proc/self/clear_refs`` = 5, and glibc's freed pages returned with ``malloc_trim``), so the
loader's transient copies do not count. RSS, unlike tracemalloc, sees torch's own allocator.

"transient" is the peak above the RSS right after the adapters were added. If the backward
into the frozen 4-bit layers' inputs materialised a dequantised copy of every weight at
once, the NF4 transient would exceed the bf16 one (same activations, gradients, optimizer
state) by at least ``dequantised`` (every quantised weight in bf16); the check compares them.

Targets (issue 16): NF4 peak <= 0.35 x fp32 peak; lorakit's NF4 peak and step time <= PEFT's.
Writes bench/results/qlora.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASES = ("fp32", "bf16", "nf4")
LIBS = ("lorakit", "peft")
# hidden, layers, intermediate, heads, vocab
SIZES = {
    "quick": (256, 2, 688, 4, 4000),
    "171m": (1024, 12, 2816, 16, 8000),
    # TinyLlama's widths and LLaMA's vocabulary, 17 layers: 1.00B parameters, about as large as a
    # 24 GiB machine trains an fp32 base of in one process beside other work
    "1b": (2048, 17, 5632, 16, 32000),
}


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def child(args: argparse.Namespace) -> None:
    common.one_thread()
    import warnings

    warnings.filterwarnings("ignore")
    import bitsandbytes  # noqa: F401  (imported in every case: the same baseline RSS)
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.hf import load_quantized

    baseline = common.rss_mib()
    if args.base == "nf4":
        model = load_quantized(args.folder, "nf4", compute_dtype="bfloat16", double_quant=True, device="cpu")
    else:
        dtype = torch.float32 if args.base == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype)
    torch.manual_seed(1)
    if args.lib == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS))
    else:
        # the adapters in the base's dtype, as lorakit keeps them (PEFT's default makes them fp32)
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        if args.base == "nf4" and not args.peft_fp32_adapters:
            # PEFT leaves them fp32 on a 4-bit base whatever the flag (it casts to the base weight's
            # dtype only when that is a float); lorakit's are in the compute dtype: same arithmetic
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(torch.bfloat16)
    model.train()
    dequantised = 0
    from lorakit.quant import bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            dequantised += m.in_features * m.out_features * 2  # bf16
    _reset_peak()
    after_inject = common.rss_mib()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times, losses = [], []
    for _ in range(1 + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = _vm_hwm_mib()
    print(
        json.dumps(
            {
                "base": args.base,
                "lib": args.lib,
                "peak_mib": round(peak - baseline, 1),
                "transient_mib": round(peak - after_inject, 1),
                "dequantised_mib": round(dequantised / 2**20, 1),
                "baseline_mib": round(baseline, 1),
                "step_s": round(statistics.median(times[1:]), 3),
                "first_loss": round(losses[0], 4),
                "loss": round(losses[-1], 4),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
        )
    )


def merge_child(args: argparse.Namespace) -> None:
    """Errors of the merge paths and of loading the QLoRA adapter elsewhere, on this model.

    NF4 without double quantisation (so :func:`lorakit.quant.grid_error_bound` is exact) and
    float32 compute (so only quantisation differs); a few training steps make B non-zero.
    """
    common.one_thread()
    import warnings

    warnings.filterwarnings("ignore")
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.hf import load_quantized
    from lorakit.quant import dequantized, grid_error_bound

    def nf4() -> Any:
        return load_quantized(args.folder, "nf4", compute_dtype="float32", double_quant=False, device="cpu").eval()

    def fp32() -> Any:
        return AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return cast(torch.Tensor, m(input_ids=ids).logits)

    model = nf4()
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ours = logits(model)
    with tempfile.TemporaryDirectory() as folder:
        lorakit.save_adapter(model, folder)
        theirs = logits(peft.PeftModel.from_pretrained(nf4(), folder).eval())
        on_fp32 = fp32()
        lorakit.load_adapter(on_fp32, folder, allow_other_base=True)
        unquantised = logits(on_fp32)
        with lorakit.disabled(on_fp32):
            fp32_base = logits(on_fp32)
        with lorakit.disabled(model):
            nf4_base = logits(model)
        exact = lorakit.merge_and_unload(on_fp32)
        dense = nf4()
        lorakit.load_adapter(dense, folder)
        lorakit.merge_and_unload(dense)
        requant = nf4()
        lorakit.load_adapter(requant, folder)
        lorakit.merge_and_unload(requant, requantize=True)
        err: dict[str, float] = {"dense_vs_exact": 0.0, "requant_vs_exact": 0.0, "requant_vs_dense": 0.0}
        bound, w_max = 0.0, 0.0
        for name, m in exact.named_modules():
            if not name.endswith(tuple(TARGETS)):
                continue
            w = m.weight.detach()
            d, q = dense.get_submodule(name).weight.detach(), requant.get_submodule(name)
            err["dense_vs_exact"] = max(err["dense_vs_exact"], float((d - w).abs().max()))
            err["requant_vs_exact"] = max(err["requant_vs_exact"], float((dequantized(q) - w).abs().max()))
            err["requant_vs_dense"] = max(err["requant_vs_dense"], float((dequantized(q) - d).abs().max()))
            bound = max(bound, float(grid_error_bound(q).max()))
            w_max = max(w_max, float(w.abs().max()))
        scale = float(unquantised.abs().max())
        out = {
            "weights_max_abs": w_max,
            "grid_bound_max": bound,
            **{f"weight_{k}": v for k, v in err.items()},
            "logits_max_abs": scale,
            "logits_peft_vs_lorakit": float((theirs - ours).abs().max()),
            "logits_on_fp32_base_vs_nf4": float((unquantised - ours).abs().max()),
            "logits_fp32_base_vs_nf4_base": float((fp32_base - nf4_base).abs().max()),
            "logits_dense_merged_vs_unmerged": float((logits(dense) - ours).abs().max()),
            "logits_requant_merged_vs_unmerged": float((logits(requant) - ours).abs().max()),
            # how much of the adapter survives requantisation: a delta under half a grid step rounds away
            "logits_adapter_effect": float((ours - nf4_base).abs().max()),
            "logits_requant_merged_vs_nf4_base": float((logits(requant) - nf4_base).abs().max()),
            "logits_exact_merged_vs_unmerged": float((logits(exact) - ours).abs().max()),
        }
    print(json.dumps({k: float(f"{v:.4g}") for k, v in out.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", choices=BASES, help=argparse.SUPPRESS)
    ap.add_argument("--lib", choices=LIBS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--quick", action="store_true", help="a small model (a smoke run)")
    ap.add_argument("--size", choices=sorted(SIZES), help="a preset shape (overrides --hidden ... --vocab)")
    ap.add_argument("--bases", default=",".join(BASES), help="comma-separated subset of fp32,bf16,nf4")
    ap.add_argument("--no-merge", action="store_true", help="skip the merge-path and interop errors")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (bytes): buffers above it are mapped and "
        "unmapped when freed, so RSS follows live tensors instead of what glibc's heap keeps",
    )
    ap.add_argument("--out", default="qlora", help="results/<out>.json")
    ap.add_argument("--peft-fp32-adapters", action="store_true", help="leave PEFT's NF4 adapters in fp32 (its default)")
    args = ap.parse_args()
    if args.quick:
        args.size = "quick"
    if args.size:
        args.hidden, args.layers, args.inter, args.heads, args.vocab = SIZES[args.size]
    bases = args.bases.split(",")
    if not set(bases) <= set(BASES):
        ap.error(f"--bases: expected a subset of {','.join(BASES)}, got {args.bases}")
    if args.child and args.merge:
        merge_child(args)
        return
    if args.child:
        child(args)
        return

    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.mmap_threshold is not None:  # read by run_child's environment
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.inter,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        print(f"LLaMA-style model: {n_params / 1e6:.0f}M parameters, batch {args.batch} x {args.seq} tokens")
        shape = ["--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq)]
        for base in bases:
            for lib in LIBS:  # lorakit and PEFT back to back: machine noise hits both alike
                row = common.run_child(
                    Path(__file__),
                    ["--base", base, "--lib", lib, "--folder", folder, "--steps", str(args.steps), *shape]
                    + (["--peft-fp32-adapters"] if args.peft_fp32_adapters else []),
                )
                print(row, flush=True)
                rows.append(row)
        merge = {} if args.no_merge else common.run_child(Path(__file__), ["--merge", "--folder", folder, *shape])
        print(merge, flush=True)
    by = {(r["base"], r["lib"]): r for r in rows}
    for r in rows:
        if "fp32" in bases:
            r["peak_vs_fp32"] = round(r["peak_mib"] / by[("fp32", r["lib"])]["peak_mib"], 3)
        r["peak_vs_peft"] = round(r["peak_mib"] / by[(r["base"], "peft")]["peak_mib"], 3)
        r["time_vs_peft"] = round(r["step_s"] / by[(r["base"], "peft")]["step_s"], 3)
    checks: dict[str, bool] = {}
    if "nf4" in bases:
        nf4 = by[("nf4", "lorakit")]
        checks["lorakit_nf4_peak_le_peft"] = nf4["peak_mib"] <= by[("nf4", "peft")]["peak_mib"]
        checks["lorakit_nf4_time_le_peft"] = nf4["step_s"] <= by[("nf4", "peft")]["step_s"]
        if "fp32" in bases:
            checks["nf4_peak_le_0.35x_fp32"] = nf4["peak_vs_fp32"] <= 0.35
        if "bf16" in bases:
            # the bf16 run holds the same activations, gradients and optimizer state: the
            # difference is what the 4-bit path adds on top
            extra = nf4["transient_mib"] - by[("bf16", "lorakit")]["transient_mib"]
            checks["nf4_extra_transient_below_all_dequantised"] = extra < nf4["dequantised_mib"]
    cols = [
        ("base", "base", ""),
        ("lib", "library", ""),
        ("peak_mib", "peak MiB", ".0f"),
        *([("peak_vs_fp32", "x fp32", ".3f")] if "fp32" in bases else []),
        ("peak_vs_peft", "x PEFT", ".3f"),
        ("transient_mib", "transient MiB", ".0f"),
        ("step_s", "step s", ".2f"),
        ("time_vs_peft", "time x PEFT", ".3f"),
        ("first_loss", "loss 1", ".4f"),
        ("loss", f"loss {1 + args.steps}", ".4f"),
        ("foreign_load", "foreign load", ".2f"),
    ]
    text = common.table(rows, cols)
    print("\n" + text + "\n")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if "nf4" in bases:
        print(f"NF4: dequantising every quantised weight at once would take {nf4['dequantised_mib']:.0f} MiB (bf16)")
    if merge:
        print("merge paths and interop (NF4, no double quantisation, fp32 compute; max abs differences):")
    for k, v in merge.items():
        if k != "foreign_load":
            print(f"  {k:36s} {v:.4g}")
    payload = {
        "machine": common.machine(),
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "merge", "base", "lib", "folder")},
        "parameters": n_params,
        "rows": rows,
        "checks": checks,
        "merge_and_interop_errors": merge,
        "table": text,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
