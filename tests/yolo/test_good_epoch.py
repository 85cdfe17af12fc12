"""The NaN-recovery point of a LoRA run (lorakit.yolo.good_epoch): what it takes, it gives back exactly,
optimizer state included, into buffers it makes once."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit.yolo.good_epoch import GoodEpoch
from lorakit.yolo.resume import changing_keys, changing_state


def _run() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, list[str]]:
    """A conv + BatchNorm net with LoRA on the conv and the BatchNorm trained fully, two AdamW steps taken
    (two parameter groups, fused: the trainer's CPU setting), and a copy standing for the EMA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    config = lorakit.LoraConfig(r=2, targets=["0", "2"], train_modules=["1"], batchnorm="update")
    lorakit.inject(model, config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "lora" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora" not in n]
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1, fused=True)
    for _ in range(2):
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, deepcopy(model), opt, changing_keys(model, config)


def _moments(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def test_restore_gives_back_what_was_taken_optimizer_and_batchnorm_statistics_included() -> None:
    model, ema, opt, keys = _run()
    assert any(k.endswith("running_var") for k in keys)  # a NaN batch corrupts these too
    live, ema_state = changing_state(model, keys), changing_state(ema, keys)
    good = GoodEpoch()
    assert not good.taken
    good.take(live, ema_state, 7, opt)
    want_live = {k: v.clone() for k, v in live.items()}
    want_ema = {k: v.clone() for k, v in ema_state.items()}
    want_moments = [v.clone() for v in _moments(opt)]
    lrs = [g["lr"] for g in opt.param_groups]
    with torch.no_grad():  # what a NaN epoch leaves
        for v in [*live.values(), *ema_state.values(), *_moments(opt)]:
            if v.is_floating_point():
                v.fill_(float("nan"))
            else:
                v.add_(5)  # num_batches_tracked
    for g in opt.param_groups:
        g["lr"] = 123.0
    good.restore(live, ema_state, opt)
    assert all(torch.equal(live[k], v) for k, v in want_live.items())
    assert all(torch.equal(ema_state[k], v) for k, v in want_ema.items())
    restored = _moments(opt)
    assert len(restored) == len(want_moments) and all(map(torch.equal, restored, want_moments))
    assert [g["lr"] for g in opt.param_groups] == lrs and good.updates == 7
    # the optimizer holds its own state again, not the recovery point's buffers: a step changes only its own
    saved = [v.clone() for v in good.ema().values()]
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    opt.step()
    assert all(map(torch.equal, good.ema().values(), saved))
    assert not all(map(torch.equal, _moments(opt), want_moments))


def test_buffers_are_made_once_and_refilled() -> None:
    model, ema, opt, keys = _run()
    live, ema_state = changing_state(model, keys), changing_state(ema, keys)
    good = GoodEpoch()
    good.take(live, ema_state, 1, opt)
    first = [id(t) for t in good.live().values()]
    with torch.no_grad():
        next(iter(live.values())).add_(1.0)
    good.take(live, ema_state, 2, opt)
    assert [id(t) for t in good.live().values()] == first
    assert all(torch.equal(good.live()[k], v) for k, v in live.items())


def test_restore_before_take_or_into_other_groups_is_refused() -> None:
    model, ema, opt, keys = _run()
    live, ema_state = changing_state(model, keys), changing_state(ema, keys)
    good = GoodEpoch()
    with pytest.raises(RuntimeError, match="nothing was taken"):
        good.restore(live, ema_state, opt)
    good.take(live, ema_state, 1, opt)
    single = torch.optim.AdamW([p for g in opt.param_groups for p in g["params"]], lr=0.1)
    before = {k: v.clone() for k, v in live.items()}
    with torch.no_grad():
        next(iter(live.values())).add_(1.0)
    moved = {k: v.clone() for k, v in live.items()}
    with pytest.raises(RuntimeError, match="1 parameter groups, the saved state 2"):
        good.restore(live, ema_state, single)
    assert all(torch.equal(live[k], v) for k, v in moved.items())  # refused before writing anything
    assert not all(torch.equal(live[k], v) for k, v in before.items())
