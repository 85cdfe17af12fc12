"""PiSSA / OLoRA init time on one 4096 x 4096 nn.Linear (float32, CPU, one thread).

    python bench/init_svd.py [--size 4096] [--rank 16]

Times ``lorakit.inject`` of one adapter with init ``"kaiming"`` (the baseline: no factorisation),
``"pissa"`` (full SVD), ``"pissa_niter_4"`` (randomised SVD, 4 subspace iterations) and
``"olora"`` (QR), each on a fresh copy of the same layer; the time includes writing the residual
and the two base fingerprints lorakit keeps for ``save_adapter(original_base=True)``.
``max |W_res + s B A - W|`` checks each init left the layer's function unchanged.

Writes bench/results/init_svd.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    common.one_thread()
    import torch
    from torch import nn

    import lorakit

    torch.manual_seed(0)
    W = nn.Linear(args.size, args.size, bias=False).weight.detach().clone()
    rows = []
    for init in ("kaiming", "pissa_niter_4", "olora", "pissa"):
        model = nn.Sequential(nn.Linear(args.size, args.size, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(W)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        lorakit.inject(model, lorakit.LoraConfig(r=args.rank, targets=["0"], init=init))
        seconds = time.perf_counter() - t0
        ad = model[0].lora["default"]
        with torch.no_grad():
            err = float((model[0].weight + ad.scaling * ad.B @ ad.A - W).abs().max())
        rows.append({"init": init, "seconds": seconds, "max_abs_err": err})
        print(f"{init}: {seconds:.2f} s", flush=True)
    cols = [("init", "init", ""), ("seconds", "inject (s)", ".2f"), ("max_abs_err", "max |W_res + sBA - W|", ".1e")]
    text = common.table(rows, cols)
    print("\n" + text)
    payload = {"machine": common.machine(), "args": vars(args), "rows": rows, "table": text}
    print(f"\nwrote {common.write_json('init_svd', payload)}")


if __name__ == "__main__":
    main()
