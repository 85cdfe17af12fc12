"""lorakit inside a user's ``transformers.Trainer`` (issue 15): checkpoints hold the adapter and
the training state, not the base weights; resume equals the uninterrupted run; and
``save_pretrained`` on an adapted model raises instead of writing a file that loses the adapter."""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import lorakit
import lorakit.hf

from .models import Tokens, llama

FLOAT32 = 4  # bytes


def _trainer(out: Path, max_steps: int = 6) -> lorakit.hf.LoraTrainer:
    model = llama()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=2, dropout=0.1))  # dropout: the RNG must resume too
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-2,
        save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="cosine", warmup_steps=1,
    )  # fmt: skip
    return lorakit.hf.LoraTrainer(model=model, args=args, train_dataset=Tokens(40))


def _train(t: transformers.Trainer, resume: str | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train(resume_from_checkpoint=resume)


def _optimizer(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}


def test_checkpoint_is_adapter_sized_and_resume_is_bitwise(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full")
    base_bytes = sum(p.numel() * FLOAT32 for n, p in full.model.named_parameters() if ".lora." not in n)
    lora = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    n_lora = sum(p.numel() for p in lora.values())
    _train(full)
    ckpt = tmp_path / "full" / "checkpoint-3"
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                          "rng_state.pth", "trainer_state.json"}, files  # fmt: skip
    # safetensors: 8-byte header length + JSON header + the fp32 factors, nothing else.
    raw = (ckpt / "adapter_model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert files["adapter_model.safetensors"] == 8 + header + n_lora * FLOAT32
    assert len(json.loads(raw[8 : 8 + header])) == len(lora) + 1  # one entry per factor, plus __metadata__
    # AdamW: exp_avg and exp_avg_sq per factor (2 * n_lora floats); torch.save's zip adds per tensor a
    # local + central directory entry (names ~40 bytes) and up to 63 bytes of alignment: < 256 bytes each.
    n_tensors = 3 * len(lora)  # + the step counter per factor
    assert 2 * n_lora * FLOAT32 < files["optimizer.pt"] < 2 * n_lora * FLOAT32 + 256 * n_tensors + 4096
    small = sum(v for k, v in files.items() if k not in ("adapter_model.safetensors", "optimizer.pt"))
    assert small < 32 * 1024  # config, scheduler, RNG states, trainer state
    assert sum(files.values()) < base_bytes  # no base weight is in the checkpoint (r=2: it is 6x the adapter)

    # save_model writes the adapter; it loads onto a fresh base with the trained weights.
    full.save_model(str(tmp_path / "saved"))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]  # fmt: skip
    fresh = llama()
    lorakit.load_adapter(fresh, tmp_path / "saved")
    trained = dict(full.model.named_parameters())
    for n, p in fresh.named_parameters():
        if ".lora." in n:
            assert torch.equal(p, trained[n]), n

    # Resume from step 3 into another trainer: bitwise the uninterrupted run (weights and AdamW state).
    part = _trainer(tmp_path / "part")
    _train(part, str(ckpt))
    a = safetensors.torch.load_file(tmp_path / "full" / "checkpoint-6" / "adapter_model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "part" / "checkpoint-6" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = _optimizer(tmp_path / "full" / "checkpoint-6"), _optimizer(tmp_path / "part" / "checkpoint-6")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (full, part)]
    assert losses[0] == losses[1], losses  # the first 3 come from trainer_state.json, the rest are recomputed


def test_save_pretrained_on_an_adapted_model_raises(tmp_path: Path) -> None:
    """Issue 15: save_pretrained wrote the LoRA tensors under names from_pretrained drops, silently."""
    model = llama()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=4))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora["default"].B.normal_()
    with pytest.raises(lorakit.hf.SavePretrainedError, match=r"LlamaForCausalLM.save_pretrained\(.*\['default'\]"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # A plain Trainer saves through save_pretrained: it raises too, before writing weights.
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True)
    with pytest.raises(lorakit.hf.SavePretrainedError):
        transformers.Trainer(model=model, args=args).save_model(str(tmp_path / "t"))
    assert not any(n.endswith(".safetensors") for n in os.listdir(tmp_path / "t"))
    # Merged, the model has no adapter left: save_pretrained is transformers' own, and from_pretrained
    # gives the merged outputs back.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    lorakit.merge_and_unload(model)
    model.save_pretrained(tmp_path / "m")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)  # fp32 merge rounding


def test_the_guard_pickles_and_copies_with_the_model(tmp_path: Path) -> None:
    model = llama()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=2))
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with pytest.raises(lorakit.hf.SavePretrainedError):
            other.save_pretrained(tmp_path / "m")
        lorakit.unload(other)
        other.save_pretrained(tmp_path / "m")  # the copy's own guard: it has no adapter left
        assert lorakit.list_adapters(model) == ["default"]
