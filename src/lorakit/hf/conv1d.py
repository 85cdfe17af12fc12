"""LoRA on transformers' ``Conv1D`` (GPT-2, GPT, ...): a Linear whose weight is stored transposed.

``Conv1D(nf, nx)`` holds ``W`` of shape ``(in, out) = (nx, nf)`` and computes
``y = x @ W + b``. The LoRA factors keep nn.Linear's (and PEFT's) layout, so files
are interchangeable with PEFT, which wraps Conv1D as a Linear with
``fan_in_fan_out=True``::

    A (r, in)    B (out, r)    y = x @ W + b + s * (x A^T) B^T
    delta W = (B A)^T, shape (in, out), W's own layout, so merging is W += s * (B A)^T
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..fused import LoraLinearFn, new_seed
from ..layers import LinearHandler, LoraLayer

if TYPE_CHECKING:
    from ..mixed_kernels import MixedPlan


def conv1d_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base ``Conv1D`` output ``x @ W + b`` (the same ``addmm`` as transformers')."""
    weight = cast(torch.Tensor, m.weight)
    bias = cast("torch.Tensor | None", m.bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return y.view(*x.shape[:-1], weight.shape[1])


class LinearLikeHandler(LinearHandler):
    """A Linear-layout handler whose forward goes through three hooks, so Conv1D and
    the partial ("parts") variants share one forward:

    * :meth:`linear_weight`: the weight as nn.Linear holds it, ``(out, in)`` (a view, no copy);
    * :meth:`base_forward`: the base layer's own output;
    * :meth:`effective_B`: the B the forward multiplies by (identity here).
    """

    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, module.weight)

    def base_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear_weight(module), cast("torch.Tensor | None", module.bias))

    def effective_B(self, module: LoraLayer, B: torch.Tensor) -> torch.Tensor:
        return B

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        bias = cast("torch.Tensor | None", module.bias)
        live = module._lora_live
        if len(live) == 1 and not torch.is_autocast_enabled(x.device.type):
            # One adapter: lorakit's fused autograd node (lorakit.fused). For Conv1D it gets
            # the W^T view and computes x @ (W^T)^T: the same addmm on the same contiguous W
            # as Conv1D itself; the grad it returns for the view is None while W is frozen.
            ad = live[0]
            p = ad.dropout if ad.training else 0.0
            seed = new_seed() if p > 0 else 0
            B = self.effective_B(module, ad.B)
            W = self.linear_weight(module)
            return cast(torch.Tensor, LoraLinearFn.apply(x, W, bias, ad.A, B, ad.scaling, p, seed))
        y = self.base_forward(module, x)
        for ad in live:
            h = F.linear(ad.drop(x), ad.A) * ad.scaling.to(x.dtype)  # (..., r): scale the narrow side
            y = y + F.linear(h, self.effective_B(module, ad.B))
        return y

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        from ..mixed_kernels import linear_mixed

        # Mixed batches use the stored B as it is (see lorakit.hf.parts for why that is exact).
        return linear_mixed(x, self.base_forward(module, x), plan)


class Conv1DHandler(LinearLikeHandler):
    """transformers ``Conv1D``: A ``(r, in)``, B ``(out, r)``, delta W = ``(B A)^T`` ``(in, out)``.

    ``kind = "linear"``, so ``targets="all-linear"`` selects it; the PEFT file layout is
    Linear's (``lora_A.weight``, ``lora_B.weight``). ``fan_in_fan_out`` tells a writer
    that PEFT needs ``fan_in_fan_out=True`` for these layers (PEFT forces it anyway).
    """

    kind = "linear"
    fan_in_fan_out = True

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n_in, n_out = cast(torch.Tensor, module.weight).shape
        return (r, n_in), (n_out, r)

    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, module.weight).t()

    def base_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return conv1d_forward(module, x)

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).t()

    dora_dim: int | None = 1  # DoRA: the weight is (in, out); one magnitude per output column

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.t())


__all__ = ["Conv1D", "Conv1DHandler", "LinearLikeHandler", "conv1d_forward"]
