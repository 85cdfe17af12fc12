"""``python -m lorakit.demo``: LoRA end to end on a small CNN, in about half a minute on a CPU.

1. Pre-train a small CNN on task A (classify stripe orientation, 4 classes).
2. Task B: the same classes, but images are inverted and noisier, so the
   pre-trained model does poorly on them.
3. Inject LoRA (r=4) into every conv and linear layer, train only the adapters on B.
4. Report trainable/total parameters, accuracies, and check the promises: the
   disabled adapter gives the base model's outputs exactly, merged equals
   unmerged, ``merge_and_unload`` leaves plain layers.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

import lorakit

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int) -> Iterator[T]:
    """tqdm when it is installed, else a plain line every 10 %."""
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for i, item in enumerate(items):
            if i % step == 0 or i == total - 1:
                print(f"{desc}: {i + 1}/{total}", flush=True)
            yield item
        return
    yield from tqdm(items, desc=desc, total=total, ncols=80)


def make_batch(n: int, domain: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1x16x16 images of stripes at one of 4 angles (the label), plus noise.

    Domain "B" turns every class by 22.5 degrees (half-way to the next class in A),
    inverts the image and doubles the noise.
    """
    labels = torch.randint(0, 4, (n,), generator=gen)
    turn = math.pi / 8 if domain == "B" else 0.0
    angle = labels.float() * (math.pi / 4) + turn + (torch.rand(n, generator=gen) - 0.5) * 0.3
    coords = torch.arange(16, dtype=torch.float32) - 7.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = 0.9 + 0.4 * torch.rand(n, 1, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    img = torch.sin(freq * proj + phase)
    noise = 0.6 if domain == "B" else 0.3
    img = img + noise * torch.randn(img.shape, generator=gen)
    if domain == "B":
        img = -img + 0.5
    return img[:, None], labels


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )


def train(model: nn.Module, domain: str, steps: int, lr: float, seed: int, desc: str) -> float:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t0 = time.perf_counter()
    for _ in progress(range(steps), desc, steps):
        x, y = make_batch(64, domain, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: nn.Module, domain: str, seed: int = 1234) -> float:
    model.eval()
    x, y = make_batch(2000, domain, torch.Generator().manual_seed(seed))
    return float((model(x).argmax(1) == y).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every check passed, else 1.

    ``--help`` prints the usage and exits 0 (argparse's ``SystemExit``) without running anything;
    an unknown argument exits 2.
    """
    argparse.ArgumentParser(
        prog="python -m lorakit.demo",
        description="LoRA end to end on a small CNN: pre-train on task A, train only a LoRA adapter on a "
        "shifted task B, then check that the disabled adapter gives the base outputs and that merging is exact. "
        "Takes no arguments; about half a minute on a CPU; exits 1 if a check fails.",
    ).parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model()
    t_pre = train(model, "A", steps=300, lr=3e-3, seed=1, desc="pre-train on A")
    acc_a, acc_b0 = accuracy(model, "A"), accuracy(model, "B")
    x_a, _ = make_batch(256, "A", torch.Generator().manual_seed(99))
    with torch.no_grad():
        base_logits = model.eval()(x_a)

    config = lorakit.LoraConfig(r=4, alpha=8, target_types=["Conv2d", "Linear"], exclude=["0"])
    report = lorakit.inject(model, config, "task_b")
    print(report)
    t_lora = train(model, "B", steps=300, lr=1e-2, seed=2, desc="LoRA on B")
    acc_b = accuracy(model, "B")

    with lorakit.disabled(model), torch.no_grad():
        disabled_equal = torch.equal(model.eval()(x_a), base_logits)
        acc_a_disabled = accuracy(model, "A")
    with torch.no_grad():
        unmerged = model.eval()(x_a)
        lorakit.merge(model)
        merged = model(x_a)
    merge_err = float((merged - unmerged).abs().max() / unmerged.abs().max())
    lorakit.merge_and_unload(model)
    plain = not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())

    rows = [
        ("trainable / total params", f"{report.trainable:,} / {report.total:,} ({report.reduction:.1f}x fewer)"),
        ("pre-train on A", f"{t_pre:.1f} s, accuracy A {acc_a:.3f}, B {acc_b0:.3f}"),
        ("LoRA on B", f"{t_lora:.1f} s, accuracy B {acc_b:.3f}"),
        ("adapter disabled", f"accuracy A {acc_a_disabled:.3f}, logits equal base: {disabled_equal}"),
        ("merged vs unmerged", f"max rel. diff {merge_err:.2e}"),
        ("merge_and_unload", f"plain layers only: {plain}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok = disabled_equal and merge_err < 1e-5 and plain and acc_b > acc_b0
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
