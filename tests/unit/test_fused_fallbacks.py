"""The fused Linear's uses of private torch internals each have a plain fallback that gives
the same numbers (issue 14).

:func:`lorakit.layers.fused_linear.rebuilt_from` reads ``grad_fn._saved_self`` /
``_saved_other`` / ``_saved_approximate`` (through ``node_saved``) and
``torch._C._autograd._top_saved_tensors_default_hooks`` (through ``_hooks_active``) only to
decide whether the layer may recompute its input in backward instead of keeping it. A torch
without them is simulated here: ``node_saved`` answering None for every attribute, the C
accessor deleted, or the accessor with another signature. Each fallback keeps x, and the
outputs and every gradient must equal the normal path *bitwise*: the fallback changes only
what is kept, never the arithmetic (the rebuilt x is the same kernel on the same inputs, so
the same values reach the same GEMMs), and a tolerance would hide a wrong rebuild.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lorakit.layers import fused_linear
from lorakit.layers.fused_linear import LoraLinearFn, rebuilt_from

torch.set_num_threads(1)
N, IN, OUT, R = 24, 20, 12, 4


def _run(source: str, p: float) -> tuple[str, list[torch.Tensor]]:
    """One fused forward and backward on an input made the way ``source`` says; returns how the
    layer would keep x (``rebuilt_from``'s kind, "" = x itself) and the output and gradients."""
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(N, IN, generator=gen, requires_grad=True) for _ in range(2)]
    W = torch.randn(OUT, IN, generator=gen)
    A = (torch.randn(R, IN, generator=gen) / R).requires_grad_()
    B = torch.randn(OUT, R, generator=gen).requires_grad_()
    s = torch.tensor(0.5)
    x = F.silu(leaves[0]) * leaves[1] if source == "mul" else F.gelu(leaves[0], approximate="tanh")
    kept = rebuilt_from(x)
    y = LoraLinearFn.apply(x, W, None, A, B, s, p, 1234)
    (y * torch.linspace(-1, 1, OUT)).sum().backward()
    grads = [t.grad for t in (*leaves, A, B) if t.grad is not None]
    return ("" if kept is None else kept[0]), [y.detach(), *grads]


def _no_saved_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_linear, "node_saved", lambda fn, name: None)


def _no_hook_accessor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


def _other_hook_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    def changed() -> None:  # takes no argument: calling it with one raises TypeError
        return None

    monkeypatch.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", changed)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("source", ["mul", "gelu"])
@pytest.mark.parametrize("missing", [_no_saved_attributes, _no_hook_accessor, _other_hook_signature])
def test_fallback_keeps_x_and_gives_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch, missing: Callable[[pytest.MonkeyPatch], None], source: str, p: float
) -> None:
    kind, normal = _run(source, p)
    assert kind == ("mul" if source == "mul" else "gelu:tanh")  # the normal path rebuilds x in backward
    missing(monkeypatch)
    kind, fallback = _run(source, p)
    assert kind == ""  # the fallback keeps x itself
    # y and the gradients of A, B and the leaves x is made from (both factors of the product; gelu's input)
    assert len(fallback) == len(normal) == (5 if source == "mul" else 4)
    for a, b in zip(normal, fallback, strict=True):
        assert torch.equal(a, b)
