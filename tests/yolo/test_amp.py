"""Mixed precision: the LoRA tensors stay fp32 (the copy the optimizer and a GradScaler update) and finite.

On a GPU Ultralytics trains with ``amp=True`` (fp16 autocast and a GradScaler; tests/gpu/test_cuda.py
runs that). On CPU its ``check_amp`` turns ``amp=True`` off and it refuses ``amp="bf16"``, so here:
a LoRA epoch with the default ``amp=True`` leaves every LoRA tensor fp32 (live, EMA, adapter files),
and then the trainer's own model takes steps the way Ultralytics' AMP loop does (fp16 autocast on
CPU, ``torch.amp.GradScaler``, unscale, clip, step, EMA update).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from yolo_helpers import TINY_TRAIN, save_random_detector

pytestmark = pytest.mark.slow
IMGSZ = 64


def _assert_fp32_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    assert tensors, what
    assert {v.dtype for v in tensors.values()} == {torch.float32}, what
    bad = [k for k, v in tensors.items() if not bool(v.isfinite().all())]
    assert not bad, (what, bad[:5])


def test_lora_tensors_stay_fp32_and_finite_through_an_epoch_and_fp16_autocast_steps(tmp_path: Path) -> None:
    from ultralytics.utils.torch_utils import unwrap_model

    from lorakit.layers import LoraLayer
    from lorakit.yolo import LoraYOLO, make_dataset

    pt = save_random_detector(tmp_path / "base.pt", seed=0)
    data = make_dataset(tmp_path / "A", domain="A", n_train=16, n_val=8, imgsz=IMGSZ, seed=0)
    model = LoraYOLO(str(pt), r=4)
    model.train(data=str(data), epochs=1, imgsz=IMGSZ, amp=True, project=str(tmp_path / "runs"), **TINY_TRAIN)
    t: Any = model.trainer
    assert t.args.amp is True and t.amp is False  # Ultralytics' check_amp: no AMP on CPU
    live = unwrap_model(t.model)
    _assert_fp32_finite({n: p for n, p in live.named_parameters() if p.requires_grad}, "live")
    _assert_fp32_finite({k: v for k, v in t.ema.ema.state_dict().items() if ".lora." in k}, "EMA")
    for folder in (t.last_adapter, t.best_adapter):
        tensors = safetensors.torch.load_file(str(Path(folder) / "adapter_model.safetensors"))
        _assert_fp32_finite({k: v for k, v in tensors.items() if "lora_" in k}, str(folder))

    # Ultralytics' AMP step (BaseTrainer._do_train / optimizer_step) on the trained LoRA model, fp16 on CPU
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: seen.add(o.dtype)) for m in live.modules() if isinstance(m, LoraLayer)
    ]
    scaler = torch.amp.GradScaler("cpu")
    lora = {n: p for n, p in live.named_parameters() if p.requires_grad and ".lora." in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    t._model_train()
    batch = t.preprocess_batch(next(iter(t.train_loader)))
    applied = 0
    for _ in range(12):  # a GradScaler skips the steps whose fp16 gradients overflow, halving its scale
        if applied == 2:
            break
        scale = scaler.get_scale()
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = t.model(batch)
        scaler.scale(loss.sum()).backward()
        grads = {n: p.grad for n, p in lora.items() if p.grad is not None}
        assert grads and {g.dtype for g in grads.values()} == {torch.float32}
        scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), max_norm=10.0)
        scaler.step(t.optimizer)
        scaler.update()
        applied += scaler.get_scale() >= scale  # not lowered: the step was taken
        t.optimizer.zero_grad()
        t.ema.update(t.model)
    for h in hooks:
        h.remove()
    assert applied == 2 and torch.float16 in seen  # steps taken, the LoRA layers computing in fp16
    _assert_fp32_finite(lora, "live after fp16 steps")
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())  # the scaled steps were taken
    _assert_fp32_finite({k: v for k, v in t.ema.ema.state_dict().items() if ".lora." in k}, "EMA after fp16 steps")
