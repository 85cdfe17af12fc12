"""lorakit inside transformers: Trainer (gradient checkpointing, eval, adapter checkpoints,
resume) and generate (adapters switched between calls, mixed batches with the KV cache)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
import lorakit.hf

from .models import Tokens, gpt2, llama


def _trainer(out: Path, max_steps: int) -> transformers.Trainer:
    model = llama()
    lorakit.inject(model, lorakit.hf.lora_config(model, r=4, alpha=8, dropout=0.1))
    lorakit.hf.prepare_for_training(model, reentrant=True)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=3e-2, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    return lorakit.hf.LoraTrainer(
        model=model, args=args, train_dataset=Tokens(24), eval_dataset=Tokens(8),
        callbacks=[lorakit.hf.AdapterCheckpointCallback()],
    )  # fmt: skip


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora." in k}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trainer_checkpointing_eval_resume(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", 6)
    start = _adapter(full.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full.train()
    logs = full.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    assert losses[-1] < losses[0], losses
    evals = [h["eval_loss"] for h in logs if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0], evals
    end = _adapter(full.model)
    assert any(not torch.equal(end[k], start[k]) for k in end)
    for step in (3, 6):
        folder = tmp_path / "full" / f"checkpoint-{step}" / "adapter"
        assert (folder / "adapter_model.safetensors").is_file()
    fresh = llama()
    lorakit.load_adapter(fresh, tmp_path / "full" / "checkpoint-6" / "adapter")
    for k, v in _adapter(fresh).items():
        assert torch.equal(v, end[k]), k

    # Stop at 3, resume from the checkpoint: the same adapter as the uninterrupted run.
    part = _trainer(tmp_path / "part", 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for k, v in _adapter(part.model).items():
        torch.testing.assert_close(v, end[k], rtol=1e-6, atol=1e-7)


def _two_adapters() -> torch.nn.Module:
    model = gpt2()
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.hf.lora_config(model, r=4), name)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(model):
                layer.lora[name].B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _gen(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    return out[:, ids.shape[1] :]


def test_generate_switching_and_mixed_batch() -> None:
    model = _two_adapters()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    lorakit.set_adapter(model, "a")
    ga = _gen(model, ids)
    lorakit.set_adapter(model, "b")
    gb = _gen(model, ids)
    with lorakit.disabled(model):
        g0 = _gen(model, ids)
    assert not torch.equal(ga, gb) and not torch.equal(ga, g0)
    lorakit.set_adapter(model, "a")
    assert torch.equal(_gen(model, ids), ga)  # switching back is exact
    # One generate call, one adapter per row, with the KV cache (batch size stays 3).
    with lorakit.mixed_batch(model, ["a", "b", None]):
        mixed = _gen(model, ids)
    assert torch.equal(mixed, torch.stack([ga[0], gb[1], g0[2]]))
    with lorakit.mixed_batch(model, ["a", "b", None]), pytest.raises(lorakit.MixedBatchError, match="3 adapter"):
        model.generate(input_ids=ids, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
