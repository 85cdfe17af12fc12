"""The layer cases every contract test runs over: one small model per layer type and option."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class Net(nn.Module):
    """``pre`` (plain, so gradients reach the input side) -> ``layer`` (adapted) -> ``post``."""

    def __init__(self, layer: nn.Module, pre: nn.Module | None = None, post: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = pre or nn.Identity()
        self.layer = layer
        self.post = post or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.layer(self.pre(x)))


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    r: int = 4
    # LoRA parameter count of "layer" for rank r, from the formulas in the docstrings.
    expected_params: Callable[[int], int] = lambda r: 0
    config: dict[str, Any] = field(default_factory=dict)


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


def _ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 7))


CASES = [
    Case("linear", lambda: Net(nn.Linear(6, 5)), _x(3, 6), expected_params=lambda r: r * (6 + 5)),
    Case(
        "linear_3d_nobias_rslora",
        lambda: Net(nn.Linear(6, 5, bias=False)),
        _x(2, 4, 6),
        expected_params=lambda r: r * (6 + 5),
        config={"use_rslora": True},
    ),
    Case(
        "conv1d_stride",
        lambda: Net(nn.Conv1d(4, 6, 3, stride=2, padding=1)),
        _x(2, 4, 11),
        expected_params=lambda r: r * 4 * 3 + 6 * r,
    ),
    Case(
        "conv2d_same_dilated_reflect",
        lambda: Net(nn.Conv2d(4, 6, 3, padding="same", dilation=2, padding_mode="reflect")),
        _x(2, 4, 9, 9),
        expected_params=lambda r: r * 4 * 9 + 6 * r,
    ),
    Case(
        "conv2d_replicate_stride2",
        lambda: Net(nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 2), padding_mode="replicate")),
        _x(2, 3, 8, 7),
        expected_params=lambda r: r * 3 * 6 + 5 * r,
    ),
    Case(
        "conv2d_groups2_circular",
        lambda: Net(nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular")),
        _x(2, 4, 6, 6),
        expected_params=lambda r: r * 2 * 9 + 6 * (r // 2),
    ),
    Case(
        "conv2d_depthwise",
        lambda: Net(nn.Conv2d(4, 4, 3, padding=1, groups=4)),
        _x(2, 4, 6, 6),
        expected_params=lambda r: r * 1 * 9 + 4 * (r // 4),
    ),
    Case(
        "conv3d",
        lambda: Net(nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), dilation=(1, 2, 1))),
        _x(1, 2, 3, 7, 5),
        expected_params=lambda r: r * 2 * 9 + 4 * r,
    ),
    Case(
        "embedding_padding_idx",
        lambda: Net(nn.Embedding(20, 6, padding_idx=0)),
        _ids,
        expected_params=lambda r: r * 20 + 6 * r,
    ),
    Case(
        "linear_dropout",
        lambda: Net(nn.Linear(6, 5)),
        _x(3, 6),
        expected_params=lambda r: r * (6 + 5),
        config={"dropout": 0.25},
    ),
]

IDS = [c.id for c in CASES]
