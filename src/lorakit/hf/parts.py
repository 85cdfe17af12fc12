"""LoRA on part of a fused projection: e.g. only q and v of GPT-2's ``c_attn = [q; k; v]``.

The LoRA paper adapted only W_q and W_v. In GPT-2 they are rows of one fused layer
(``c_attn``: 768 -> 2304 = q | k | v). :func:`target_fused` marks such layers; a
later :func:`lorakit.inject` then gives each chosen part its own rank-``r/P`` update
and leaves the other parts exactly as they were::

    parts ("q", "v"), r = 8, out = 3 * d           A (8, in)       B (3d, 8)

              cols 0..3   cols 4..7
        q   [   B_q    |     0     ]     rows 0 .. d
        k   [    0     |     0     ]     rows d .. 2d     <- stays 0: k is never adapted
        v   [    0     |    B_v    ]     rows 2d .. 3d

    delta W = B A = [B_q A_0:4 ; 0 ; B_v A_4:8]: two independent rank-4 updates.

Why this layout: it *is* a plain rank-``r`` LoRA whose B happens to have zero blocks,
so everything else stays exact and compatible:

* merging is the ordinary ``W + s * B A`` (exact, and ``(B A)^T`` for Conv1D);
* the files are PEFT's ordinary Linear/Conv1D files (``A (r, in)``, ``B (out, r)``,
  the config's r and alpha): PEFT loads them and computes the same outputs;
* lorakit loads them into a plain model as a plain LoRA with the same outputs,
  or, after :func:`target_fused` on the fresh model, as a parts adapter again.

How the zero blocks stay zero: the forward multiplies by
``torch.where(mask, B, B.detach())``, whose *value* is B (every entry, so outputs
always equal PEFT's for the same file) but whose gradient reaches only the mask's
blocks. The other entries get exact-zero gradients, so SGD, Adam and AdamW (weight
decay included) leave them at their initial value, which is 0 for the default
inits (``"kaiming"``, ``"gaussian"``; ``"random"`` is for tests and starts them non-zero).

Rank and scaling: ``r`` is the layer's *total* rank, split evenly (``r % P == 0``);
each part gets rank ``r / P`` and the scaling is ``alpha / r``. To reproduce the paper's
"rank k on q and on v, scaling alpha_k / k" use ``r = 2 k`` and ``alpha = 2 alpha_k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ..config import match_pattern
from ..errors import TargetError
from ..layers import LoraLayer
from ..registry import register
from .conv1d import Conv1D, Conv1DHandler, LinearLikeHandler

QKV = ("q", "k", "v")


class PartsConv1D(Conv1D):
    """A ``Conv1D`` whose LoRA adapts only the output slices in ``lora_parts``.

    Made by :func:`target_fused` (class swap in place: same object, same parameters,
    ``isinstance(m, Conv1D)`` stays true). ``lora_parts`` holds ``(name, start, stop)``
    output ranges; ``lora_split`` all the named slices of the layer.
    """

    lora_parts: tuple[tuple[str, int, int], ...]
    lora_split: tuple[tuple[str, int, int], ...]

    def __repr__(self) -> str:
        return f"PartsConv1D(nf={self.nf}, nx={self.nx}, parts={[p[0] for p in self.lora_parts]})"


class PartsLinear(nn.Linear):
    """An ``nn.Linear`` whose LoRA adapts only the output slices in ``lora_parts`` (see :class:`PartsConv1D`)."""

    lora_parts: tuple[tuple[str, int, int], ...]
    lora_split: tuple[tuple[str, int, int], ...]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={[p[0] for p in self.lora_parts]}"


def part_mask(module: nn.Module, r: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(out, r)``: True where part ``p`` (rows ``start:stop``) meets its rank columns
    ``p*r/P : (p+1)*r/P``."""
    parts = cast(PartsLinear, module).lora_parts
    out = sum(stop - start for _, start, stop in cast(PartsLinear, module).lora_split)
    rp = r // len(parts)
    mask = torch.zeros(out, r, dtype=torch.bool, device=device)
    for i, (_, start, stop) in enumerate(parts):
        mask[start:stop, i * rp : (i + 1) * rp] = True
    return mask


class _PartsMixin(LinearLikeHandler):
    dora_dim: int | None = None  # DoRA's branch would bypass effective_B's per-part gradient mask: refused at inject

    def check(self, module: nn.Module, r: int, name: str) -> None:
        n = len(cast(PartsLinear, module).lora_parts)
        if r % n:
            raise TargetError(
                f"{name}: LoRA on parts {[p[0] for p in cast(PartsLinear, module).lora_parts]} splits the rank "
                f"evenly, so r must be a multiple of {n}, got r={r}"
            )

    def effective_B(self, module: LoraLayer, B: torch.Tensor) -> torch.Tensor:
        if not B.requires_grad:
            return B
        # Value: B itself, every entry. Gradient: only inside the parts' blocks.
        return torch.where(part_mask(module, B.shape[1], B.device), B, B.detach())


class PartsConv1DHandler(_PartsMixin, Conv1DHandler):
    """:class:`PartsConv1D`: Conv1D shapes and merge, gradient only in the parts' blocks of B."""


class PartsLinearHandler(_PartsMixin, LinearLikeHandler):
    """:class:`PartsLinear`: Linear shapes and merge, gradient only in the parts' blocks of B."""


register(PartsConv1D, PartsConv1DHandler())
register(PartsLinear, PartsLinearHandler())

_PARTS_CLASS: dict[type[nn.Module], type[nn.Module]] = {Conv1D: PartsConv1D, nn.Linear: PartsLinear}


def _out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1])
    return int(cast(nn.Linear, module).out_features)


def _split(name: str, out: int, split: Sequence[str] | Mapping[str, int]) -> tuple[tuple[str, int, int], ...]:
    if isinstance(split, Mapping):
        sizes = [(str(k), int(v)) for k, v in split.items()]
    else:
        names = list(split)
        if not names or out % len(names):
            raise TargetError(f"{name}: cannot split {out} outputs evenly into {names}; pass split={{name: size}}")
        sizes = [(str(k), out // len(names)) for k in names]
    if sum(s for _, s in sizes) != out or any(s <= 0 for _, s in sizes):
        raise TargetError(f"{name}: split sizes {dict(sizes)} must be positive and add up to its {out} outputs")
    if len({k for k, _ in sizes}) != len(sizes):
        raise TargetError(f"{name}: split names {[k for k, _ in sizes]} must be unique")
    out_ranges, start = [], 0
    for k, s in sizes:
        out_ranges.append((k, start, start + s))
        start += s
    return tuple(out_ranges)


def target_fused(
    model: nn.Module,
    targets: str | Iterable[str],
    parts: Sequence[str] = ("q", "v"),
    split: Sequence[str] | Mapping[str, int] = QKV,
) -> list[str]:
    """Mark fused projections so a later :func:`lorakit.inject` adapts only ``parts`` of them.

    Every ``Conv1D`` or ``nn.Linear`` whose path matches ``targets`` (LoraConfig pattern
    rules) becomes a :class:`PartsConv1D` / :class:`PartsLinear` in place. Its outputs are
    cut into the slices ``split`` names (equal sizes for a list of names; a
    ``{name: size}`` mapping for unequal ones, e.g. grouped-query attention), and only
    ``parts`` of them get LoRA. Then inject as usual, with ``targets`` in the config.

    Example (the LoRA paper's q, v on GPT-2)::

        lorakit.hf.target_fused(model, "c_attn", parts=("q", "v"))
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets=["c_attn"]))

    Returns:
        The paths changed, in module order.

    Raises:
        TargetError: nothing matched; a matched layer is not Conv1D/Linear, already has
            adapters, or cannot be split as asked; a part is not in ``split``.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    chosen = tuple(parts)
    if not chosen or len(set(chosen)) != len(chosen):
        raise TargetError(f"target_fused: parts must be unique, non-empty names, got {list(chosen)}")
    found = [(n, m) for n, m in model.named_modules() if n and any(match_pattern(p, n) for p in patterns)]
    if not found:
        raise TargetError(f"target_fused: no module matched {patterns}")
    plans = []
    for name, module in found:
        if isinstance(module, LoraLayer):
            raise TargetError(f"{name}: already has adapters; call target_fused before lorakit.inject")
        base = type(module)
        if base in _PARTS_CLASS.values():
            base = base.__mro__[1]
        if base not in _PARTS_CLASS:
            raise TargetError(f"{name}: target_fused needs a Conv1D or nn.Linear, got {type(module).__name__}")
        ranges = _split(name, _out_features(module), split)
        lookup = {k: (k, a, b) for k, a, b in ranges}
        missing = [p for p in chosen if p not in lookup]
        if missing:
            raise TargetError(f"{name}: parts {missing} are not in split {[k for k, _, _ in ranges]}")
        plans.append((name, module, _PARTS_CLASS[base], tuple(lookup[p] for p in chosen), ranges))
    for _, module, cls, chosen_ranges, ranges in plans:
        module.__class__ = cls
        module.lora_parts = chosen_ranges
        module.lora_split = ranges
    return [name for name, *_ in plans]


def restore_fused(model: nn.Module) -> list[str]:
    """Turn every :class:`PartsConv1D` / :class:`PartsLinear` without adapters back into its
    plain class (e.g. after :func:`lorakit.merge_and_unload`). Returns the paths changed.

    Raises:
        TargetError: such a layer still has adapters (unload or merge them first).
    """
    done = []
    for name, module in model.named_modules():
        if isinstance(module, (PartsConv1D, PartsLinear)):
            if isinstance(module, LoraLayer):
                raise TargetError(f"{name}: still has adapters; merge_and_unload or unload first")
            module.__class__ = type(module).__mro__[1]
            del module.lora_parts, module.lora_split
            done.append(name)
    return done
