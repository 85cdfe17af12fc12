"""``lorakit hf train quantize=nf4|fp4|int8``: QLoRA from the command's vocabulary.

The base's Linear layers are loaded quantised (bitsandbytes, on this CPU), frozen; the adapters
train on top. That the run really trained on the quantised base is shown by the file's base
fingerprint: it loads strictly onto the quantised model and is refused on the fp32 one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.errors import ConfigError
from lorakit.hf.train import latest_checkpoint, train

from .runs import causal_data, opts, tensors

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantised_base_trains_and_its_adapter_fits_that_base(
    quantize: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from lorakit.hf import load_quantized
    from lorakit.io_errors import AdapterFileError

    llama, out = tiny_models["llama"], tmp_path / quantize
    train(opts(llama, causal_data(tmp_path / "d.jsonl"), out, epochs=4, lr=2e-2, quantize=quantize, device="cpu"))
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    losses = json.loads((ckpt / "state.json").read_text())["losses"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.98 * sum(losses[:5]), losses  # as the fp32 run of test_train_keys
    assert {v.dtype for v in tensors(out / "adapter", "adapter_model.safetensors").values()} == {torch.float32}
    q = load_quantized(llama, quantize, compute_dtype="float32", device="cpu")
    lorakit.load_adapter(q, out / "adapter")  # strict: the base fingerprint is the quantised base's
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(llama)
    with pytest.raises(AdapterFileError, match="base"):
        lorakit.load_adapter(fp32, out / "adapter")


def test_resuming_with_another_quantisation_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    train(opts(tiny_models["llama"], data, out, quantize="nf4", stop_after=1, device="cpu"))
    with pytest.raises(ConfigError, match="quantize: saved 'nf4', now 'none'"):
        train(opts(tiny_models["llama"], data, out, resume=True, device="cpu"))
