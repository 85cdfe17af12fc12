"""combine_adapters and hot-swapping on a quantised base (NF4 and LLM.int8()).

A 4-bit weight is stored packed (two values a byte, shape ``(out * in / 2, 1)``), so anything
that shapes a delta like the stored weight breaks on it; these pin that the combined and the
swapped adapters compute what they claim, and that the quantised bytes are never touched.

Tolerances: a combined adapter reorders the branch (``cat`` folds ``w s`` into B; ``svd``
refactors the delta), so its fp32 rounding differs: compared layer by layer, 1e-5 of the
output's scale is ~100 ulps (2^-23 each) of headroom. A hot-swapped adapter holds the file's
values (zero-padded: the extra terms add exact zeros), so the whole model is compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.io_errors import BaseModelMismatchError

from ..hf.models import llama
from .conftest import WIDTHS, base_bytes, load, logits, quantised_layers

QUANTIZE = ["nf4", "int8"]


def tol(want: torch.Tensor) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5 * float(want.abs().max())}


def with_adapters(folder: Path, quantize: str) -> nn.Module:
    """The quantised tiny Llama with adapters "a" (r=4) and "b" (r=2) on every Linear, B random."""
    model = load(folder, quantize)
    for name, r, seed in (("a", 4, 1), ("b", 2, 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear"), name=name)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in quantised_layers(model).values():
                B = m.lora[name].B
                B.copy_(torch.randn(B.shape, generator=gen) * 0.1)
    return model


def layer_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each quantised layer's output on its own fixed input: LLM.int8() also rounds its input
    to int8, so a rounding-level change upstream can move a logit by a whole activation step;
    fed the same input, a layer differs only by the adapter branch's rounding."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return {n: m(torch.randn(3, m.in_features, generator=gen)) for n, m in quantised_layers(model).items()}


@pytest.mark.parametrize("quantize", QUANTIZE)
@pytest.mark.parametrize(("method", "r"), [("cat", None), ("svd", 6)])
def test_combined_adapter_equals_the_sum(quantize: str, method: str, r: int | None, llama_dir: Path) -> None:
    model = with_adapters(llama_dir, quantize)
    lorakit.set_adapter(model, ["a", "b"])
    both = layer_outputs(model)
    before = base_bytes(model)
    report = lorakit.combine_adapters(model, ["a", "b"], new_name="c", method=method, r=r)
    assert len(report.layers) == len(both) and report.relative_error < 1e-5
    assert {t.r for t in report.layers} == {6}  # cat: 4 + 2; svd at r = 6 keeps all of it
    lorakit.set_adapter(model, "c")
    for n, y in layer_outputs(model).items():
        torch.testing.assert_close(y, both[n], **tol(both[n]))
    after = base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_hotswap_equals_a_fresh_load(quantize: str, llama_dir: Path, tmp_path: Path) -> None:
    """Same rank (copied), smaller (zero-padded in place) and larger (grown), each equal to
    loading the file into a fresh quantised model; the quantised bytes stay as they were."""
    source = with_adapters(llama_dir, quantize)
    files = {n: lorakit.save_adapter(source, tmp_path / n, name=n) for n in ("a", "b")}
    model = with_adapters(llama_dir, quantize)  # the same base, other adapters: seeds swapped below
    before = base_bytes(model)
    for name, file, kind in (("b", files["b"], "layers"), ("a", files["b"], "padded"), ("b", files["a"], "grown")):
        report = lorakit.hotswap_adapter(model, file, name=name)
        assert len(getattr(report, kind)) == len(quantised_layers(model)), (name, kind)
        lorakit.set_adapter(model, name)
        fresh = load(llama_dir, quantize)
        lorakit.load_adapter(fresh, file)
        if quantize == "int8":  # LLM.int8() rounds each layer's input: compare layers on their own inputs
            got, wanted = layer_outputs(model), layer_outputs(fresh)
            for n, want in wanted.items():
                torch.testing.assert_close(got[n], want, **tol(want))
        else:
            want = logits(fresh)
            torch.testing.assert_close(logits(model), want, **tol(want))
    after = base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_hotswap_refuses_a_file_of_the_unquantised_base(llama_dir: Path, tmp_path: Path) -> None:
    dense = llama(seed=0, **WIDTHS)
    lorakit.inject(dense, lorakit.LoraConfig(r=2, targets="all-linear"), name="b")
    file = lorakit.save_adapter(dense, tmp_path / "dense", name="b")
    model = with_adapters(llama_dir, "nf4")
    lorakit.set_adapter(model, "b")
    want = logits(model)
    with pytest.raises(BaseModelMismatchError):
        lorakit.hotswap_adapter(model, file, name="b")
    assert torch.equal(logits(model), want)  # nothing changed
    lorakit.hotswap_adapter(model, file, name="b", allow_other_base=True)  # the documented way through
