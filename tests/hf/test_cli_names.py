"""One default alpha everywhere, "did you mean" in ``lorakit hf``, and transformers model folders
as ``model=``/``base=`` of ``lorakit inspect`` and ``lorakit merge``."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
import transformers

import lorakit
import lorakit.hf
from lorakit.cli import main
from lorakit.hf.options import TrainOptions

from .models import gpt2


def test_default_alpha_is_r_everywhere() -> None:
    # One meaning of alpha: scaling alpha / r = 1 unless set, in the core, lorakit.hf and hf train.
    model = gpt2()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=4))
    scalings = {float(m.lora["default"].scaling) for m in model.modules() if isinstance(m, lorakit.LoraLayer)}
    assert scalings == {1.0}
    # hf train passes lora_alpha to lora_config: r by default, as LoraConfig and LoraYOLO (alpha=None).
    assert TrainOptions(model="m", data="d", out="o", r=16).lora_alpha == 16.0
    assert TrainOptions(model="m", data="d", out="o", r=16, alpha=8).lora_alpha == 8.0


def test_hf_typos_name_the_close_key(capsys) -> None:
    assert main(["hf", "train", "model=m", "data=d", "out=o", "epoch=3"]) == 2
    assert "unknown key 'epoch' for 'hf train'; did you mean 'epochs'?" in capsys.readouterr().err
    assert main(["hf", "generate", "model=m", "promt=hi"]) == 2
    assert "did you mean 'prompt'?" in capsys.readouterr().err
    assert main(["hf", "trian"]) == 2
    assert "unknown hf subverb 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_inspect_and_merge_take_a_transformers_folder(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = tiny_models["gpt2"]
    assert main(["inspect", f"model={folder}", "r=4"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "Conv1D" in out

    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=4, init="random"))
    adapter = lorakit.save_adapter(model, tmp_path / "a")
    merged = tmp_path / "m.safetensors"
    assert main(["merge", f"base={folder}", f"adapter={adapter}", f"out={merged}"]) == 0
    fresh = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    fresh.load_state_dict(safetensors.torch.load_file(str(merged)))
    ids = torch.tensor([[4, 17, 18, 35]])
    with torch.no_grad():
        # float32 logits of order 1 from a 2-layer model: merging reorders a few sums, 1e-5 covers it.
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_folder_without_config_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["inspect", f"model={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"model={str(tmp_path)!r} is a folder without config.json" in err and len(err.strip().splitlines()) == 1
