"""Frozen BatchNorm: layers that run in eval mode even under ``model.train()``.

``LoraConfig(batchnorm="frozen")`` (the default) freezes them at :func:`lorakit.inject`;
removing the last adapter releases them.
"""

from __future__ import annotations

from torch import nn

from . import owned


def _keep_eval(module: nn.Module, args: object) -> None:
    # A forward pre-hook (a module-level function, so models still pickle): runs
    # before every BatchNorm forward and undoes what model.train() set.
    module.training = False


def freeze_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` run in eval mode from now on,
    even under ``model.train()``: normalise with the running statistics and
    never update them. Returns how many layers were frozen. Idempotent;
    :func:`release_batchnorm` undoes it."""
    for module in owned.every_module(model):  # also the copies and originals not installed now
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and _keep_eval not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_keep_eval)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def release_batchnorm(model: nn.Module) -> None:
    """Undo :func:`freeze_batchnorm` (the layers follow ``model.train()/eval()`` again)."""
    for module in owned.every_module(model):
        hooks = module._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is _keep_eval]:
            del hooks[key]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.training = model.training
