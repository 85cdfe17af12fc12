"""Merging a QLoRA adapter: the three paths and their error bounds.

The bounds come from the quantisation grid itself (:func:`lorakit.quant.grid_error_bound`:
half the widest gap between 4-bit codes times each block's absmax; half an int8 step plus
bitsandbytes' fp16 cast per row), not from tuned numbers:

* dense (``merge_and_unload``): ``deq(Q(W0)) + s B A`` in fp32: the quantised model's own
  computation, so equal to the unmerged layer to fp32 rounding;
* requantised (``requantize=True``): that weight rounded to the grid once more: within
  one grid bound of the dense path;
* exact (the adapter on the unquantised base, merged there): ``W0 + s B A``: the dense
  path differs from it by the base's own quantisation error, within one grid bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.quant import dequantized, grid_error_bound

from ..hf.models import llama
from .conftest import WIDTHS, load, logits, quantised_layers
from .test_qlora_train import train

# fp32 rounding of a sum of a few terms of size |W|: a few ulps (2^-23 each) of the largest weight
ULPS = 8 * 2.0**-23


def trained(folder: Path, quantize: str, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = load(folder, quantize)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    train(model, steps=4)
    lorakit.save_adapter(model, tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_merge_paths_and_their_bounds(quantize: str, llama_dir: Path, tmp_path: Path) -> None:
    model, folder = trained(llama_dir, quantize, tmp_path)
    unmerged = logits(model)
    layers = quantised_layers(model)
    old = {n: (dequantized(m), grid_error_bound(m)) for n, m in layers.items()}
    adapters = {n: m.lora["default"] for n, m in layers.items()}
    deltas = {n: (ad.scaling * ad.B @ ad.A).detach() for n, ad in adapters.items()}

    with pytest.raises(ConfigError, match="quantised base"):  # in place would be lossy: refused, nothing changed
        lorakit.merge(model)
    assert torch.equal(logits(model), unmerged)

    fresh = load(llama_dir, quantize)
    lorakit.load_adapter(fresh, folder)
    lorakit.merge_and_unload(fresh)
    requant = load(llama_dir, quantize)
    lorakit.load_adapter(requant, folder)
    lorakit.merge_and_unload(requant, requantize=True)
    exact = llama(seed=0, **WIDTHS)  # the unquantised fp32 base the quantised one was made from
    with pytest.warns(UserWarning, match="saved on a different base model"):  # the fingerprint tells them apart
        lorakit.load_adapter(exact, folder, allow_other_base=True)
    lorakit.merge_and_unload(exact)

    for name, (w_q, bound_old) in old.items():
        w_dense = fresh.get_submodule(name).weight.detach()
        assert type(fresh.get_submodule(name)) is torch.nn.Linear and w_dense.dtype == torch.float32
        torch.testing.assert_close(w_dense, w_q + deltas[name], atol=ULPS * float(w_q.abs().max()), rtol=0)

        new = requant.get_submodule(name)
        assert type(new) is layers[name]._lora_base_cls  # Linear4bit / Linear8bitLt again
        err_requant = (dequantized(new) - w_dense).abs()
        assert (err_requant <= grid_error_bound(new) * (1 + ULPS)).all(), float(err_requant.max())

        w_exact = exact.get_submodule(name).weight.detach()
        err_dense = (w_dense - w_exact).abs()  # = the base's own quantisation error
        assert (err_dense <= bound_old * (1 + ULPS) + ULPS * float(w_exact.abs().max())).all()
        assert err_dense.max() > 0  # the paths really differ: quantisation is lossy

    if quantize == "nf4":
        # 4-bit: bitsandbytes dequantises and runs a float32 matmul, so the dense model computes
        # what the unmerged quantised one did, to fp32 rounding
        scale = float(unmerged.abs().max())
        torch.testing.assert_close(logits(fresh), unmerged, atol=1e-5 * scale, rtol=0)


def test_requantize_keeps_the_kind(llama_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    _, folder = trained(llama_dir, "nf4", tmp_path)
    model = load(llama_dir, "nf4")
    lorakit.load_adapter(model, folder)
    lorakit.merge_and_unload(model, requantize=True)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q) is bnb.nn.Linear4bit and q.weight.quant_state.quant_type == "nf4"
    assert not list(lorakit.lora_layers(model))
