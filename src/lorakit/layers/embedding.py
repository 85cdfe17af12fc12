"""LoRA on ``nn.Embedding``: the handler and its per-sample kernel.

Files use PEFT's embedding keys (``lora_embedding_A``, ``lora_embedding_B``). Mixed
batches: one lookup in the stacked table ``(K+1)*V x r``, ids offset by ``slot * V``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerHandler, LoraAdapter, LoraLayer, register
from .mixed_plan import MixedPlan, check_batch

__all__ = ["EmbeddingHandler", "embedding_mixed"]


class EmbeddingHandler(LayerHandler):
    """``nn.Embedding`` (num_embeddings V, dim D): A ``(r, V)``, B ``(D, r)``.

    ``y[t] = W[ids[t]] + s * B A[:, ids[t]]``; delta W = ``(B A)^T``, shape ``(V, D)``.
    Default init draws A ~ N(0, 1) (a Kaiming bound of 1/sqrt(V) would make the
    looked-up rows tiny) and B = 0. No dropout on token ids.
    """

    kind = "embedding"
    file_keys = ("lora_embedding_A", "lora_embedding_B")  # PEFT's: plain tensors, no ".weight"

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = cast(nn.Embedding, module)
        return (r, m.num_embeddings), (m.embedding_dim, r)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        with torch.no_grad():
            nn.init.normal_(A, std=1.0 / r if init == "gaussian" else 1.0)
            if init == "random":
                nn.init.normal_(B)
            else:
                B.zero_()

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        y = F.embedding(x, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        for ad in module._lora_live:
            h = F.embedding(x, ad.A.t(), m.padding_idx) * ad.scaling.to(ad.A.dtype)
            y = y + F.linear(h, ad.B)
        return y

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).t()

    def mixed_forward(self, module: LoraLayer, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        y = F.embedding(x, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return embedding_mixed(m, x, y, plan)

    # DoRA, PEFT's convention for embeddings: one magnitude per embedding dimension, the norm over the vocabulary
    dora_dim: int | None = 1
    branch_dropout = False

    def base_nobias(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = cast(nn.Embedding, module)
        return F.embedding(x, weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def branch(self, module: nn.Module, ad: LoraAdapter, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(x, ad.A.t(), cast(nn.Embedding, module).padding_idx) * s, ad.B)


def embedding_mixed(layer: nn.Module, ids: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """One lookup in the stacked ``(K+1) * V x r`` table, ids offset by ``slot * V``."""
    m = cast(nn.Embedding, layer)
    n = check_batch(plan, ids)
    assert plan.A is not None and plan.B is not None and plan.scaling is not None
    v = m.num_embeddings
    table = plan.A.transpose(1, 2).reshape(-1, plan.A.shape[1])  # ((K+1)*V, r)
    offset = (plan.index * v).view(n, *([1] * (ids.dim() - 1)))
    h = F.embedding(ids + offset, table) * plan.scaling[plan.index].view(n, *([1] * ids.dim()))
    B = plan.B[plan.index]  # (N, D, r)
    d = torch.bmm(h.reshape(n, -1, h.shape[-1]), B.transpose(1, 2))
    return y + d.reshape(y.shape)


register(nn.Embedding, EmbeddingHandler())
