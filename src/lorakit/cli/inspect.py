"""``lorakit inspect``: the layers LoRA can adapt, and what rank r would cost."""

from __future__ import annotations

from torch import nn

from ..config import LoraConfig
from ..inject import select_targets
from ..registry import handler_for
from .args import ArgError, parse_args
from .models import load_base

KEYS = {"model", "r", "targets", "target_types", "exclude", "args"}


def layer_table(model: nn.Module, r: int, config: LoraConfig | None) -> tuple[list[tuple[str, ...]], int, int]:
    """Rows (path, type, weight shape, layer params, LoRA params at r, selected?) and totals."""
    chosen = {name for name, _, _ in select_targets(model, config)} if config else None
    rows: list[tuple[str, ...]] = []
    budget = 0
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is None:
            continue
        a_shape, b_shape = handler.factor_shapes(module, r)
        lora = _numel(a_shape) + _numel(b_shape)
        weight = getattr(module, handler.weight_name)
        selected = chosen is None or name in chosen
        if selected:
            budget += lora
        mark = "" if chosen is None else ("yes" if selected else "-")
        rows.append(
            (
                name or "<root>",
                type(module).__name__,
                "x".join(map(str, weight.shape)),
                f"{weight.numel():,}",
                f"{lora:,}",
                mark,
            )
        )
    total = sum(p.numel() for p in model.parameters())
    return rows, budget, total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run(argv: list[str]) -> int:
    opts = parse_args(argv, KEYS, "inspect")
    if "model" not in opts:
        raise ArgError("model=... is required, e.g. model=torchvision.models:resnet18")
    model = load_base(str(opts["model"]), opts.get("args"), "model")
    r = opts.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ArgError(f"r must be an int > 0 (the LoRA rank), got r={r!r}")
    config = None
    if "targets" in opts or "target_types" in opts:
        config = LoraConfig(
            r=r,
            targets=opts.get("targets", ()),
            target_types=opts.get("target_types", ()),
            exclude=opts.get("exclude", ()),
        )
    rows, budget, total = layer_table(model, r, config)
    header = ("layer", "type", "weight", "params", f"lora r={r}", "selected" if config else "")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    what = "selected layers" if config else "all adaptable layers"
    print(
        f"\n{len(rows)} adaptable layers; LoRA r={r} on {what}: {budget:,} trainable of {total:,} "
        f"base parameters ({100.0 * budget / max(total, 1):.2f}%)"
    )
    return 0
