"""The LoRA trainer's EMA averages only what training changes (lorakit.yolo.trainer.average_what_changes),
and gives exactly what Ultralytics' EMA of every entry gives."""

from __future__ import annotations

import torch

import lorakit


def test_averaging_what_changes_equals_ultralytics_average_of_everything_bitwise() -> None:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    from lorakit.yolo.targets import class_convs
    from lorakit.yolo.trainer import LoraOptions, average_what_changes

    torch.manual_seed(0)
    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    lorakit.inject(model, LoraOptions().build(model, class_convs(model)))  # LoRA, BatchNorm and class convs train
    every, some = ModelEMA(model), ModelEMA(model)
    assert average_what_changes(some, model)
    floats = [v for v in model.state_dict().values() if v.is_floating_point()]
    kept = some._pairs[0]
    assert 0 < len(kept) < len(floats)
    assert sum(t.numel() for t in kept) < 0.25 * sum(t.numel() for t in floats)  # the frozen base is most of it
    start = {k: v.clone() for k, v in every.ema.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    changing = [p for p in model.parameters() if p.requires_grad] + [
        b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
    ]
    for _ in range(3):  # what training steps do: move the trained tensors and the BatchNorm statistics
        with torch.no_grad():
            for t in changing:
                t.add_(torch.randn(t.shape, generator=gen) * 0.1)
        every.update(model)
        some.update(model)
    a, b = every.ema.state_dict(), some.ema.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    moved = [k for k, v in start.items() if not torch.equal(a[k], v)]
    assert any(".lora." in k for k in moved) and any(k.endswith("running_var") for k in moved)
    assert not average_what_changes(some, model)  # an EMA that has updated is left as it is
