"""LoRA+: optimizer parameter groups in which B learns ``ratio`` times faster than A.

Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024
(arXiv:2402.12354).

The maths: a LoRA layer adds ``s * B A x`` with ``A`` ``(r, n_in)`` and ``B`` ``(n_out, r)``,
``B = 0`` at the start. In the limit of a wide model (width ``n``), the paper shows that one
learning rate ``eta`` for both factors cannot make both learn features efficiently: the
update of ``B A x`` stays Theta(1) (neither vanishing nor exploding with ``n``) only if
``eta_B = Theta(1)`` and ``eta_A = Theta(1/n)``, so ``eta_B / eta_A`` should grow with the
width. In practice a fixed ratio ``lambda = eta_B / eta_A`` is used; the paper suggests
``lambda = 2**4 = 16`` for language models (reporting up to about 2x faster fine-tuning and
1-2% better accuracy at the same cost), the default here. LoRA+ changes only the
optimizer, not the model or the adapter file.

PEFT's ``create_loraplus_optimizer`` differs in two details: it gives 1-D parameters
(biases) B's rate and LoRA factors of embeddings a fixed ``1e-6``; here only B factors
get ``lr * ratio`` (embedding ones included) and every other trainable parameter ``lr``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from .config import finite_number
from .errors import ConfigError, TargetError
from .layers import adapter_dict
from .state import lora_layers


def _factor_ids(model: nn.Module, who: str) -> tuple[set[int], set[int]]:
    """The ids of every adapter's A and B factors in ``model``.

    Raises:
        TargetError: ``model`` has no LoRA layers.
    """
    a_ids: set[int] = set()
    b_ids: set[int] = set()
    layers = 0
    for _, layer in lora_layers(model):
        layers += 1
        for ad in adapter_dict(layer).values():
            a_ids.add(id(ad.A))
            b_ids.add(id(ad.B))
    if not layers:
        raise TargetError(f"{who}: {type(model).__name__} has no LoRA layers; inject an adapter (lorakit.inject) first")
    return a_ids, b_ids


def loraplus_split(optimizer: Optimizer, model: nn.Module, ratio: float = 16.0) -> Optimizer:
    """LoRA+ on an optimizer built already (by a training engine, with its own groups).

    Each group's B factors move to a new group with the same settings and ``lr * ratio``
    (and ``initial_lr * ratio`` when a scheduler has set it), so weight decay, an engine's
    own group keys (Ultralytics' bias warm-up) and schedules that scale each group's ``lr``
    keep working. Call it before the first step. Returns ``optimizer``.

    Raises:
        ConfigError: ``ratio`` is not a finite number > 0, or ``optimizer`` has state already.
        TargetError: ``model`` has no LoRA layers.
    """
    if not finite_number(ratio) or ratio <= 0:
        raise ConfigError(f"loraplus_split: ratio must be a finite number > 0, got {ratio!r}")
    if optimizer.state:
        raise ConfigError("loraplus_split: the optimizer has stepped already; split its groups before training")
    _, b_ids = _factor_ids(model, "loraplus_split")
    added = []
    for group in optimizer.param_groups:
        b = [p for p in group["params"] if id(p) in b_ids]
        if not b:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in b_ids]
        scaled = {k: v for k, v in group.items() if k != "params"}
        scaled["lr"] = group["lr"] * ratio
        if "initial_lr" in group:
            scaled["initial_lr"] = group["initial_lr"] * ratio
        added.append({**scaled, "params": b})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for group in added:
        optimizer.add_param_group(group)
    return optimizer


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for any ``torch.optim`` optimizer, LoRA+ style (module docstring)::

        opt = torch.optim.AdamW(lorakit.loraplus_groups(model, lr=2e-4, ratio=16))

    Groups, in this order, each left out when it would be empty, each parameter in exactly
    one (model order within a group; only parameters with ``requires_grad``):

    * the A factors of every adapter: ``lr``;
    * the B factors: ``lr * ratio``;
    * every other trainable parameter (``train_modules`` copies, trained biases): ``lr``.

    Every group has ``weight_decay``. The keys are ``params``, ``lr`` and ``weight_decay``,
    so an lr schedule that scales each group's ``lr`` keeps the ratio.

    Raises:
        ConfigError: ``lr`` or ``ratio`` is not a finite number > 0, or ``weight_decay`` not
            one >= 0 (naming it and the value).
        TargetError: ``model`` has no LoRA layers (inject an adapter first), or none of
            its LoRA factors trains (all frozen).
    """
    for name, value, low in (("lr", lr, "> 0"), ("ratio", ratio, "> 0"), ("weight_decay", weight_decay, ">= 0")):
        ok = finite_number(value)
        if not ok or not (value > 0 if low == "> 0" else value >= 0):
            raise ConfigError(f"loraplus_groups: {name} must be a finite number {low}, got {value!r}")
    a_ids, b_ids = _factor_ids(model, "loraplus_groups")
    a: list[nn.Parameter] = []
    b: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for p in model.parameters():  # deduplicated: a shared parameter comes once
        if p.requires_grad:
            (a if id(p) in a_ids else b if id(p) in b_ids else other).append(p)
    if not a and not b:
        raise TargetError(
            f"loraplus_groups: no LoRA factor of {type(model).__name__} trains (requires_grad is False on all); "
            "LoRA+ has nothing to scale"
        )
    groups = [(a, lr), (b, lr * ratio), (other, lr)]
    return [{"params": ps, "lr": rate, "weight_decay": weight_decay} for ps, rate in groups if ps]
