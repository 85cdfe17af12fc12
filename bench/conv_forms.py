"""Each adapted YOLO conv at the run's real shapes: which LoRA form is cheaper, and what ``mode="auto"`` picks.

    python bench/conv_forms.py                          # yolo26n, batch 16, imgsz 160
    python bench/conv_forms.py --model yolo26s --imgsz 640 --batch 8
    python bench/conv_forms.py --channels-last             # weights and inputs channels-last, as CPU training

For every conv the detector's default LoRA adapts (r=8), with the input shape it
sees in a training step, one forward + backward of that layer alone (the output
gradient random, the input requiring grad as inside a network) is timed for:

* ``full``: the plain conv, weight trainable (what full fine-tuning pays);
* ``floor``: the plain conv, weight frozen (the least any LoRA form can pay);
* ``activation``: LoRA's ``conv(x, W) + B conv(x, A)``;
* ``weight``: LoRA's ``conv(x, W + s B A)``.

Medians of ``--reps`` runs after one warm-up, one thread, in CPU time (steady when other
processes share the machine). Prints per-layer rows (with
``--layers``) and the sums; writes ``bench/results/conv_forms_<model>_<imgsz>.json``.
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

FORMS = ["full", "floor", "activation", "weight"]


def _time(fn: Any, reps: int) -> float:
    """Median CPU seconds of ``fn`` (one thread: the compute itself, steady on a shared machine)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo26n")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", action="store_true", help="print every layer")
    ap.add_argument("--channels-last", action="store_true", help="time channels-last (lorakit.yolo.layout)")
    args = ap.parse_args()
    common.one_thread()
    from lorakit.yolo import offline

    offline.enable()
    import torch
    from ultralytics.nn.tasks import DetectionModel

    import lorakit
    from lorakit.conv_forms import measure_conv_forms
    from lorakit.inject import lora_layers
    from lorakit.layers import ConvHandler
    from lorakit.yolo.targets import class_convs
    from lorakit.yolo.trainer import LoraOptions

    torch.manual_seed(0)
    model = DetectionModel(f"{args.model}.yaml", nc=3, verbose=False)
    lorakit.inject(model, LoraOptions().build(model, class_convs(model)))
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        from lorakit.yolo.layout import to_channels_last

        to_channels_last(model)
    layers = list(lora_layers(model))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(_record(n, shapes)) for n, m in layers]
    model.train()
    with torch.no_grad():
        model(torch.rand(args.batch, 3, args.imgsz, args.imgsz))
    for h in hooks:
        h.remove()
    handler = ConvHandler()
    # The count rule's choice, then the measured one (what the YOLO trainer does), then every form timed.
    auto = {n: "weight" if handler.use_weight_form(layer) else "activation" for n, layer in layers}
    for _, layer in layers:
        for ad in layer._lora_live:
            ad.B.data.normal_(0, 0.01)
    t0 = time.perf_counter()
    measured = measure_conv_forms(model, lambda: model(torch.zeros(args.batch, 3, args.imgsz, args.imgsz)))
    tune_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for name, layer in layers:
        x = torch.randn(shapes[name]).contiguous(memory_format=layout).requires_grad_()
        row: dict[str, Any] = {"layer": name, "shape": list(shapes[name]), "auto": auto[name]}
        row["measured"] = "weight" if measured[name]["chosen"] else "activation"
        for form in FORMS:
            row[form] = _time(lambda form=form, layer=layer, x=x: _step(layer, x, form), args.reps)
        row["best"] = min(("activation", "weight"), key=lambda f, row=row: row[f])
        rows.append(row)
        if args.layers:
            print(
                f"{name:30s} {str(shapes[name]):22s} "
                + " ".join(f"{f}={row[f] * 1e3:7.2f}ms" for f in FORMS)
                + f" auto={row['auto']} measured={row['measured']} best={row['best']}",
                flush=True,
            )
    sums = {f: sum(r[f] for r in rows) for f in FORMS}
    sums["auto"] = sum(r[r["auto"]] for r in rows)
    sums["measured"] = sum(r[r["measured"]] for r in rows)
    sums["best"] = sum(r[r["best"]] for r in rows)
    print(f"\n{args.model} batch {args.batch} imgsz {args.imgsz}: {len(rows)} adapted convs, seconds per step (sum)")
    for k, v in sums.items():
        print(f"  {k:11s} {v:.4f}  ({v / sums['full']:.2f}x full)")
    for pick in ("auto", "measured"):
        wrong = [r["layer"] for r in rows if r[pick] != r["best"]]
        print(f"  {pick} picks the slower form on {len(wrong)} of {len(rows)} layers")
    print(f"  measuring took {tune_s:.2f} s")
    common.write_json(
        f"conv_forms_{args.model}_{args.imgsz}" + ("_cl" if args.channels_last else ""),
        {"machine": common.machine(), "args": vars(args), "sums": sums, "tune_s": tune_s, "rows": rows},
    )
    return 0


def _step(layer: Any, x: Any, form: str) -> None:
    """One forward + backward of ``layer`` alone: plain conv (weight trainable or frozen) or a LoRA form."""
    import torch

    from lorakit.layers import CONV_FORM_ATTR, live_rank

    w = layer.weight
    kept = layer.__dict__.get(CONV_FORM_ATTR)
    w.requires_grad_(form == "full")
    try:
        if form in ("full", "floor"):
            y = layer._conv_forward(x, w, layer.bias)
        else:
            layer.__dict__[CONV_FORM_ATTR] = (form, live_rank(layer))
            y = layer(x)
        y.backward(torch.ones_like(y))
    finally:
        layer.__dict__[CONV_FORM_ATTR] = kept
        w.requires_grad_(False)
        x.grad = w.grad = None
        for p in layer.parameters():
            p.grad = None


def _record(name: str, shapes: dict[str, tuple[int, ...]]) -> Any:
    def hook(module: Any, inputs: tuple[Any, ...]) -> None:
        shapes[name] = tuple(inputs[0].shape)

    return hook


if __name__ == "__main__":
    raise SystemExit(main())
