"""Adapter benchmark: load, switch, mixed batches (lorakit vs PEFT) and injection scaling.

    python bench/adapters.py [--quick]

1. load: time to load one saved adapter file into the LLaMA-style model (r=16, all
   projections), lorakit ``load_adapter`` vs PEFT ``PeftModel.load_adapter``.
2. switch: time of one ``set_adapter`` between two loaded adapters, on the
   LLaMA-style model and on yolo26n (Conv2d targets), vs PEFT.
3. mixed batch: eval throughput (samples/s) of one batch where each sample names its
   own adapter, with 1, 8 and 32 distinct adapters, vs PEFT's ``adapter_names=``, at
   32 x 32 tokens (prefill: each forward enters its own ``mixed_batch`` block, so the
   block's set-up is included) and 32 x 1 (a decode step: timed inside one block, as a
   generation loop runs it; the block's entry is reported on its own row); outputs
   compared to each other.
4. injection scaling: ``inject`` time on models with 1k-8k Linear targets (it should
   grow linearly: the last column is time per target).

In 1-3 lorakit and PEFT calls alternate (switches in turns of 20), so machine noise hits
both alike.

Writes bench/results/adapters.json and adapters.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_step import build  # noqa: E402


def _median_time(fn: Any, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _alternating_medians(fns: list[Any], repeats: int, block: int = 1) -> list[float]:
    """Median time per call of each function, in turns of ``block`` calls, so machine noise
    hits them alike; ``repeats`` turns each."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, ts, strict=True):
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _random_adapter(model: Any, cfg: Any, name: str, seed: int) -> None:
    import torch

    import lorakit

    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.LoraConfig(**{**cfg, "init": "random"}), name)


def bench_load_switch(rows: list[dict[str, Any]], repeats: int) -> None:
    import peft
    import torch

    import lorakit

    base, _, targets = build("llama")
    base.eval()
    cfg = {"r": 16, "alpha": 32, "targets": ["re:" + targets[0]]}
    with tempfile.TemporaryDirectory() as tmp:
        src = copy.deepcopy(base)
        _random_adapter(src, cfg, "a", 1)
        lorakit.save_adapter(src, Path(tmp) / "a", "a")
        _random_adapter(src, cfg, "b", 2)
        lorakit.save_adapter(src, Path(tmp) / "b", "b")
        del src

        model = copy.deepcopy(base)

        def lk_load() -> None:
            lorakit.load_adapter(model, Path(tmp) / "a", "x")
            lorakit.delete_adapter(model, "x")

        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "b", adapter_name="b")

        def pf_load() -> None:
            pm.load_adapter(Path(tmp) / "a", adapter_name="x")
            pm.delete_adapter("x")

        t_lk, t_pf = _alternating_medians([lk_load, pf_load], repeats)
        rows.append({"bench": "load adapter", "model": "llama", "lorakit": t_lk, "peft": t_pf, "unit": "s"})
        print(f"load: lorakit {t_lk * 1e3:.1f} ms, PEFT {t_pf * 1e3:.1f} ms")

        lorakit.load_adapter(model, Path(tmp) / "a", "a")
        lorakit.load_adapter(model, Path(tmp) / "b", "b")
        pm.load_adapter(Path(tmp) / "a", adapter_name="a")
        state = {"lk": 0, "pf": 0}

        def lk_switch() -> None:
            state["lk"] ^= 1
            lorakit.set_adapter(model, "ab"[state["lk"]])

        def pf_switch() -> None:
            state["pf"] ^= 1
            pm.set_adapter("ab"[state["pf"]])

        # turns of 20 switches: one PEFT switch walks every module (about 10 ms of Python)
        # and leaves the caches cold for a sub-millisecond one, so call-by-call alternation
        # would time lorakit on a cold cache (0.76 ms in one run here, 0.44 ms in turns in the next)
        t_lk, t_pf = _alternating_medians([lk_switch, pf_switch], repeats, block=20)
        rows.append({"bench": "switch adapter", "model": "llama", "lorakit": t_lk, "peft": t_pf, "unit": "s"})
        print(f"switch llama: lorakit {t_lk * 1e6:.0f} us, PEFT {t_pf * 1e6:.0f} us")
        # switching touched no base weight
        ids = torch.randint(0, 32000, (1, 16))
        with torch.no_grad(), lorakit.disabled(model):
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def bench_switch_yolo(rows: list[dict[str, Any]], repeats: int) -> None:
    try:
        from lorakit.yolo import offline

        offline.enable()
        from ultralytics.nn.tasks import DetectionModel
    except Exception as exc:  # noqa: BLE001 - report why the row is missing
        print(f"switch yolo26n: skipped ({exc})")
        return
    import lorakit
    from lorakit.yolo import detector_config

    model = DetectionModel("yolo26n.yaml", verbose=False)
    cfg = detector_config(model, r=16)
    lorakit.inject(model, cfg, "a")
    lorakit.inject(model, cfg, "b")
    state = {"i": 0}

    def lk_switch() -> None:
        state["i"] ^= 1
        lorakit.set_adapter(model, "ab"[state["i"]])

    t_lk = _median_time(lk_switch, repeats * 20)
    rows.append({"bench": "switch adapter", "model": "yolo26n", "lorakit": t_lk, "peft": None, "unit": "s"})
    print(f"switch yolo26n: lorakit {t_lk * 1e6:.0f} us")


def bench_mixed(rows: list[dict[str, Any]], counts: list[int], repeats: int) -> None:
    """Mixed-batch throughput at two shapes: 32 sequences x 32 tokens (a prefill) and
    32 x 1 (a decode step: one new token per sequence, where a server mixing tenants spends
    most of its calls; the linear layers see the same 32 rows as with a KV cache)."""
    import peft
    import torch

    import lorakit

    base, _, targets = build("llama")
    base.eval()
    n = 32
    for k in counts:
        names = [f"t{i}" for i in range(k)]
        lk = copy.deepcopy(base)
        for i, name in enumerate(names):
            _random_adapter(lk, {"r": 16, "alpha": 32, "targets": ["re:" + targets[0]]}, name, 10 + i)
        lk.eval()
        per_sample = [names[i % k] for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                lorakit.save_adapter(lk, Path(tmp) / name, name)
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / names[0], adapter_name=names[0])
            for name in names[1:]:
                pm.load_adapter(Path(tmp) / name, adapter_name=name)
            pm.eval()
            for seq in (32, 1):
                ids = torch.randint(0, 32000, (n, seq), generator=torch.Generator().manual_seed(seq))
                block = contextlib.ExitStack()
                if seq == 1:  # decode: the block spans the generation loop
                    block.enter_context(torch.no_grad())
                    block.enter_context(lorakit.mixed_batch(lk, per_sample))

                def lk_run(lk: Any = lk, per_sample: list[str] = per_sample, ids: Any = ids, seq: int = seq) -> Any:
                    if seq == 1:
                        return lk(input_ids=ids).logits
                    with torch.no_grad(), lorakit.mixed_batch(lk, per_sample):
                        return lk(input_ids=ids).logits

                def pf_run(pm: Any = pm, per_sample: list[str] = per_sample, ids: Any = ids) -> Any:
                    with torch.no_grad():
                        return pm(input_ids=ids, adapter_names=per_sample).logits

                with block:
                    diff = float((lk_run() - pf_run()).abs().max())
                    reps = repeats if seq > 1 else repeats * 10
                    t_lk, t_pf = _alternating_medians([lk_run, pf_run], reps)
                rows.append(
                    {
                        "bench": f"mixed batch, {k} adapters, {n}x{seq}",
                        "model": "llama",
                        "lorakit": n / t_lk,
                        "peft": n / t_pf,
                        "unit": "samples/s",
                        "max_abs_diff": diff,
                    }
                )
                print(
                    f"mixed {k} ({n}x{seq}): lorakit {n / t_lk:.1f} samples/s, PEFT {n / t_pf:.1f} samples/s "
                    f"(x{t_pf / t_lk:.2f}), max |diff| {diff:.1e}"
                )

        def enter(lk: Any = lk, per_sample: list[str] = per_sample) -> None:
            with lorakit.mixed_batch(lk, per_sample):
                pass

        t_enter = _median_time(enter, repeats * 3)
        rows.append({"bench": f"mixed_batch entry, {k} adapters", "model": "llama", "lorakit": t_enter, "unit": "s"})
        print(f"mixed_batch entry, {k} adapters: {t_enter * 1e3:.1f} ms")


def bench_inject(rows: list[dict[str, Any]], sizes: list[int]) -> None:
    from torch import nn

    import lorakit

    for size in sizes:
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(size)])
        t0 = time.perf_counter()
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_types=["Linear"]))
        dt = time.perf_counter() - t0
        rows.append(
            {
                "bench": f"inject {size} targets",
                "model": "mlp",
                "lorakit": dt,
                "peft": None,
                "unit": "s",
                "per_target_us": dt / size * 1e6,
            }
        )
        print(f"inject {size}: {dt:.3f} s ({dt / size * 1e6:.0f} us per target)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    args = ap.parse_args()
    common.one_thread()
    repeats = 3 if args.quick else 7
    rows: list[dict[str, Any]] = []
    bench_load_switch(rows, repeats)
    bench_switch_yolo(rows, repeats)
    bench_mixed(rows, [1, 8] if args.quick else [1, 8, 32], repeats)
    bench_inject(rows, [1000, 2000] if args.quick else [1000, 2000, 4000, 8000])
    for r in rows:
        if r.get("peft"):
            better_high = r["unit"] == "samples/s"
            r["lorakit_advantage"] = r["lorakit"] / r["peft"] if better_high else r["peft"] / r["lorakit"]
    common.report(
        "adapters",
        args,
        rows,
        [
            ("bench", "benchmark", ""),
            ("model", "model", ""),
            ("lorakit", "lorakit", ".4g"),
            ("peft", "PEFT", ".4g"),
            ("unit", "unit", ""),
            ("lorakit_advantage", "lorakit advantage (x)", ".2f"),
            ("per_target_us", "us per target", ".0f"),
        ],
        {
            r["bench"]: {"lorakit advantage over PEFT": r["lorakit_advantage"]}
            for r in rows
            if r.get("lorakit_advantage")
        },
        "x better than PEFT",
        "Adapters: lorakit vs PEFT (1 thread)",
    )


if __name__ == "__main__":
    main()
