"""The GPU check: ``tests/gpu`` and a short GPU benchmark, in one command (``make gpu-check``).

    python bench/gpu_check.py               # on a CUDA machine: about 4-5 min on one H200
    python bench/gpu_check.py --cpu-smoke   # every code path at toy sizes on CPU (no GPU needed; ~1-2 min)

1. ``pytest tests/gpu`` (the CUDA arithmetic tests and a YOLO LoRA epoch with ``amp=True``).
2. LLaMA-style LoRA training step, lorakit vs PEFT, everything in bf16 (base and adapters:
   PEFT with ``autocast_adapter_dtype=False``, as lorakit's adapters take the base's dtype):
   a LlamaForCausalLM from LlamaConfig (hidden 1024, 12 layers, 16 heads, intermediate 2816,
   vocab 32000: about 220M parameters), LoRA r=16, alpha=32 on every attention and MLP
   projection, batch 8 x 512 tokens, fused AdamW; median of 10 timed steps after 3 warm-up
   steps -> tokens/s, and the peak CUDA memory of the process (``max_memory_allocated``).
   Then the same with a QLoRA base: the weights reloaded with NF4 Linear layers
   (:func:`lorakit.hf.load_quantized`, bf16 compute), lorakit vs PEFT on that same model.
3. yolo26n LoRA (LoraYOLO defaults) vs full fine-tuning (Ultralytics' own trainer) with AMP
   (``amp=True``, Ultralytics' default) on generated data (:func:`lorakit.yolo.make_dataset`,
   the demo's generator; 512 images at 320 px, batch 32): seconds per epoch, the second of two
   (the first pays cuDNN autotuning and the label cache).

Each measurement runs in a fresh interpreter (its peak memory is its own). Writes
``bench/results/gpu_check.json`` naming the GPU and prints a table. Without a CUDA device it
says so and exits 0 having done nothing (``--cpu-smoke`` writes to ``--out`` or a temp dir,
never over the GPU results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

ROOT = HERE.parent
TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# (GPU, --cpu-smoke) sizes
LLAMA = {
    False: {"hidden": 1024, "layers": 12, "heads": 16, "inter": 2816, "vocab": 32000, "batch": 8, "seq": 512},
    True: {"hidden": 64, "layers": 2, "heads": 4, "inter": 128, "vocab": 128, "batch": 2, "seq": 32},
}
STEPS = {False: (3, 10), True: (1, 2)}  # warm-up, timed
YOLO_SIZES = {
    False: {"n_train": 512, "n_val": 64, "imgsz": 320, "batch": 32, "epochs": 2, "workers": 4},
    True: {"n_train": 8, "n_val": 4, "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0},
}
TIMEOUT = {"pytest": 200, "child": 150}  # seconds; the whole check must stay under 6 min on one H200


# --------------------------------------------------------------------------------------------
# children: one measurement per interpreter, its result as the last JSON line on stdout
# --------------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def child_llama(lib: str, smoke: bool) -> dict[str, Any]:
    """One LoRA training-step measurement of the LLaMA-style model with ``lib`` (lorakit or peft), in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cpu" if smoke else "cuda")
    s = LLAMA[smoke]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        intermediate_size=s["inter"],
        vocab_size=s["vocab"],
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with device:  # built on the device: initialising 220M parameters on one CPU thread would take seconds
        model: Any = LlamaForCausalLM(cfg).to(torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    lib, _, base = lib.partition("-")
    if base == "nf4":  # QLoRA: the same weights reloaded with 4-bit NF4 Linear layers (bitsandbytes)
        from lorakit.hf import load_quantized

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            model = load_quantized(folder, "nf4", compute_dtype="bfloat16", device=str(device))
    if lib == "peft":
        import peft

        pcfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none")
        model = peft.get_peft_model(model, pcfg, autocast_adapter_dtype=False)
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets=["re:" + TARGETS]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []

    def step() -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        losses.append(float(loss.detach()))
        return {"step": time.perf_counter() - t0}

    warmup, steps = STEPS[smoke]
    timing = common.timed_steps(step, warmup, steps)
    return {
        "bench": "llama",
        "lib": lib,
        "base": base or "bf16",
        "params_m": round(total / 1e6, 1),
        "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "step_s": timing["step"],
        "tokens_per_s": s["batch"] * s["seq"] / timing["step"],
        "peak_mib": _peak_mib(device),
        "loss_finite": all(math.isfinite(v) for v in losses),
    }


def _epoch_meter(model: Any) -> list[float]:
    """Seconds of each training epoch, recorded by Ultralytics callbacks."""
    times: list[float] = []
    start: list[float] = []
    model.add_callback("on_train_epoch_start", lambda t: start.append(time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda t: times.append(time.perf_counter() - start[-1]))
    return times


def child_yolo(arm: str, smoke: bool, work: Path) -> dict[str, Any]:
    """One yolo26n fine-tuning run (``arm``: lora or full) with AMP on the generated data in ``work``."""
    from lorakit.yolo import offline

    offline.enable(work / "yolo_config")
    import torch
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    s = YOLO_SIZES[smoke]
    model = LoraYOLO(str(work / "base.pt")) if arm == "lora" else YOLO(str(work / "base.pt"))
    epochs = _epoch_meter(model)
    extra = {} if arm == "lora" else {"optimizer": "AdamW", "lr0": 0.001}  # the demo's full fine-tuning lr
    model.train(
        data=str(work / "data" / "data.yaml"),
        epochs=s["epochs"],
        imgsz=s["imgsz"],
        batch=s["batch"],
        nbs=s["batch"],
        warmup_epochs=0,
        workers=s["workers"],
        val=False,
        plots=False,
        amp=True,
        device="cpu" if smoke else 0,
        project=str(work / "runs"),
        name=arm,
        exist_ok=True,
        verbose=False,
        seed=0,
        deterministic=False,
        **extra,
    )
    t = model.trainer
    trainable = {id(p): p.numel() for g in t.optimizer.param_groups for p in g["params"] if p.requires_grad}
    device = torch.device("cpu" if smoke else "cuda")
    return {
        "bench": "yolo",
        "arm": arm,
        "amp": bool(t.amp),
        "epochs_s": epochs,
        "epoch_s": epochs[-1],
        "trainable": sum(trainable.values()),
        "peak_mib": _peak_mib(device),
    }


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def _prepare_yolo(work: Path, smoke: bool) -> None:
    """The generated data set and a random-weight 2-class yolo26n saved as the base ``.pt``."""
    from lorakit.yolo import make_dataset, offline

    offline.enable(work / "yolo_config")
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    s = YOLO_SIZES[smoke]
    make_dataset(work / "data", domain="A", n_train=s["n_train"], n_val=s["n_val"], imgsz=s["imgsz"], seed=0)
    torch.manual_seed(0)
    y = YOLO("yolo26n.yaml")
    y.model = DetectionModel("yolo26n.yaml", nc=2, verbose=False)
    y.save(work / "base.pt")


def _gpu_tests(smoke: bool) -> dict[str, Any]:
    """``pytest tests/gpu`` in a child; its summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT["pytest"])
    except subprocess.TimeoutExpired:
        return {"exit": None, "summary": f"timed out after {TIMEOUT['pytest']} s", "seconds": TIMEOUT["pytest"]}
    lines = [ln for ln in done.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    if done.returncode not in (0, 5):  # 5: nothing collected
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return {
        "exit": done.returncode,
        "summary": lines[-1].strip("= ") if lines else done.stdout[-300:],
        "seconds": round(time.perf_counter() - t0, 1),
        "smoke": smoke,
    }


def _child(args: list[str], smoke: bool) -> dict[str, Any]:
    try:
        return common.run_child(Path(__file__), [*args, *(["--cpu-smoke"] if smoke else [])], TIMEOUT["child"])
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # one failed measurement must not lose the others
        print(f"gpu-check: {' '.join(args)} failed: {str(e)[-2000:]}", file=sys.stderr)
        return {"error": str(e)[-2000:], "child": args}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(res: dict[str, Any]) -> str:
    lines = [f"GPU: {res['gpu']}", f"tests/gpu: {res['tests']['summary']} (exit {res['tests']['exit']})", ""]
    lines.append(f"{'LLaMA LoRA step (bf16)':<26}{'tokens/s':>12}{'step ms':>10}{'peak MiB':>10}")
    for r in res["llama"]:
        if "error" in r:
            lines.append(f"  {r['child'][1]:<24}failed")
            continue
        tok, ms, peak = _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["step_s"] * 1e3, ".1f"), _fmt(r["peak_mib"], ",.0f")
        lines.append(f"  {r['lib'] + ', ' + r['base'] + ' base':<24}{tok:>12}{ms:>10}{peak:>10}")
    lines += ["", f"{'yolo26n epoch (AMP)':<26}{'s/epoch':>12}{'amp':>10}{'peak MiB':>10}{'trainable':>12}"]
    for r in res["yolo"]:
        if "error" in r:
            lines.append(f"  {r['child'][1]:<24}failed")
            continue
        epoch, peak = _fmt(r["epoch_s"], ".2f"), _fmt(r["peak_mib"], ",.0f")
        lines.append(f"  {r['arm']:<24}{epoch:>12}{r['amp']!s:>10}{peak:>10}{r['trainable']:>12,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: exercise every code path")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/gpu_check.json; smoke: a temp dir)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    smoke = bool(a.cpu_smoke)
    if a.child:
        kind = a.child[0]
        result = child_llama(a.child[1], smoke) if kind == "llama" else child_yolo(a.child[1], smoke, Path(a.child[2]))
        print(json.dumps(result))
        return 0

    import torch

    if not smoke and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing checked, nothing written. "
            "Run it on a machine with an NVIDIA GPU, or `python bench/gpu_check.py --cpu-smoke` to exercise the script."
        )
        return 0
    t0 = time.perf_counter()
    gpu = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    print(f"gpu-check on {gpu}: tests/gpu ...", flush=True)
    res: dict[str, Any] = {"gpu": gpu, "smoke": smoke, "machine": common.machine(), "tests": _gpu_tests(smoke)}
    res["cuda"] = torch.version.cuda
    print(f"  {res['tests']['summary']}\nLLaMA-style LoRA step, lorakit vs PEFT ...", flush=True)
    res["llama"] = [_child(["llama", lib], smoke) for lib in ("lorakit", "peft", "lorakit-nf4", "peft-nf4")]
    print("yolo26n LoRA vs full fine-tuning with AMP ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorakit-gpu-check-") as tmp:
        work = Path(tmp)
        _prepare_yolo(work, smoke)
        res["yolo"] = [_child(["yolo", arm, str(work)], smoke) for arm in ("lora", "full")]
    res["settings"] = {"llama": LLAMA[smoke], "steps": STEPS[smoke], "yolo": YOLO_SIZES[smoke]}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out = a.out or (Path(tempfile.gettempdir()) / "gpu_check_cpu_smoke.json" if smoke else None)
    path = common.write_json("gpu_check", res) if out is None else _write(out, res)
    print("\n" + _table(res))
    print(f"\nwrote {path}; wall time {res['wall_s']:.0f} s")
    failed = res["tests"]["exit"] not in (0, 5) or any("error" in r for r in res["llama"] + res["yolo"])
    return 1 if failed else 0


def _write(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
