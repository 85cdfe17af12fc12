"""A new layer type is one handler and one ``register`` call (README, "How lorakit adapts a layer").

``Scaled`` below is a layer lorakit has never heard of: not an ``nn.Linear`` subclass, just a
module with a ``weight`` computing ``x W^T * c``. Its handler, defined here, says the factor
shapes, the init, the forward and the delta weight; it relies on the protocol's defaults for
everything else (file layout, rank padding). Then inject, train, merge, unmerge, save and load
run on it with no other change to lorakit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer

torch.set_num_threads(1)


class Scaled(nn.Module):
    """``y = x W^T * c``: a weight and a fixed output scale."""

    def __init__(self, n_in: int, n_out: int, c: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() * self.c


class ScaledHandler(lorakit.LayerHandler):
    """A ``(r, in)``, B ``(out, r)``; ``y = x W^T c + s (x A^T) B^T c``, so merging ``W + s B A`` is exact."""

    def factor_shapes(self, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n_out, n_in = cast(Scaled, module).weight.shape
        return (r, n_in), (n_out, r)

    def init_factors(self, A: torch.Tensor, B: torch.Tensor, init: str, r: int) -> None:
        with torch.no_grad():
            nn.init.normal_(A, std=1.0 / r)
            if init == "random":
                nn.init.normal_(B)
            else:
                B.zero_()

    def forward(self, module: LoraLayer, x: torch.Tensor) -> torch.Tensor:
        m = cast(Scaled, module)
        y = x @ m.weight.t() * m.c
        for ad in module._lora_live:
            y = y + (ad.drop(x) @ ad.A.t() * ad.scaling) @ ad.B.t() * m.c
        return y

    def delta_weight(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A


lorakit.register(Scaled, ScaledHandler())


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # the same "pre-trained" base each time
    return nn.Sequential(Scaled(8, 16, 0.5), nn.Tanh(), Scaled(16, 4, 2.0))


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def trained_model() -> nn.Sequential:
    """Scaled layers adapted (selected by type) and trained one SGD step, so B is not zero."""
    model = make_model()
    base = model(X)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_types=[Scaled]))
    assert all(isinstance(m, LoraLayer) for m in (model[0], model[2]))
    assert torch.equal(model(X), base)  # B = 0: outputs unchanged, bitwise
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4  # A and B of each layer; the base is frozen
    opt = torch.optim.SGD(trainable, lr=0.5)
    model(X).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(X), base)  # the step changed the outputs
    assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[1])
    return model


def test_inject_train_merge_unmerge_on_a_registered_layer_type() -> None:
    model = trained_model()
    model.eval()
    with torch.no_grad():
        unmerged = model(X)
        with lorakit.disabled(model):
            assert torch.equal(model(X), make_model()(X))  # adapters off: the base, bitwise
        pristine = [model[0].weight.clone(), model[2].weight.clone()]
        lorakit.merge(model)
        merged = model(X)
        # Merging reassociates fp32 sums of at most 16 terms per layer (two layers): each sum rounds
        # within a few ulps of its largest term; 64 float32 ulps of the largest output bounds it
        # with room (the README's demo allows 1024 on a whole YOLO model).
        tol = 64 * torch.finfo(torch.float32).eps * float(unmerged.abs().max())
        assert float((merged - unmerged).abs().max()) <= tol
        assert not torch.equal(model[0].weight, pristine[0])  # the delta is in the weight
        lorakit.unmerge(model)
        assert torch.equal(model[0].weight, pristine[0]) and torch.equal(model[2].weight, pristine[1])
        assert torch.equal(model(X), unmerged)  # unmerge restores bitwise


def test_save_and_load_a_registered_layer_type(tmp_path: Path) -> None:
    model = trained_model()
    model.eval()
    lorakit.save_adapter(model, tmp_path)
    fresh = make_model().eval()
    report = lorakit.load_adapter(fresh, tmp_path)
    assert report.complete and report.base_matches
    with torch.no_grad():
        # the same factors, scaling and forward: bitwise
        assert torch.equal(fresh(X), model(X))


def test_a_layer_types_own_file_keys_are_read_as_factors() -> None:
    """A reader requires factor tensors to be floating point; it knows them by key, and a registered
    layer type's own keys (``file_keys``) count as soon as it is registered."""
    from lorakit.io_peft import factor_key_test

    class Named(Scaled):
        pass

    class NamedHandler(ScaledHandler):
        file_keys = ("down", "up")

    before = factor_key_test()
    lorakit.register(Named, NamedHandler())
    after = factor_key_test()
    assert not before("base_model.model.layer.down") and after("base_model.model.layer.down")
    assert after("base_model.model.up")  # a layer at the root: the key is the suffix itself
    assert after("base_model.model.a.lora_A.weight") and after("base_model.model.a.lora_embedding_B")
    assert after("base_model.model.a.b.lora_magnitude_vector")  # DoRA's, from the variant
    assert not after("base_model.model.a.b.weight")  # a trained module's tensor
    assert not after("base_model.model.a.xdown")  # not at a dot boundary
    assert not after("a.lora_A.weight")  # not under PEFT's prefix
