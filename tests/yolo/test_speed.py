"""lorakit's trainer speed-ups (lorakit.yolo.speed): channels-last training, the same maths as the usual
layout, files in the usual layout; the setup's heap frozen for the garbage collector while training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.batchnorm import freeze_batchnorm
from lorakit.layers.conv import _pointwise
from lorakit.yolo import layout


def _lora_detector() -> nn.Module:
    from ultralytics.cfg import get_cfg  # imported in the test: the conftest makes Ultralytics offline first
    from ultralytics.nn.tasks import DetectionModel

    from lorakit.yolo.trainer import LoraOptions

    torch.manual_seed(0)
    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    lorakit.inject(model, LoraOptions().build(model, []))
    for m in model.modules():  # as the trainer leaves them: B non-zero so every LoRA path carries a gradient
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            freeze_batchnorm(m)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    return model.train()


def _grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch)[0].sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_channels_last_training_step_equals_the_usual_layout(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and every gradient (LoRA factors, BatchNorm, fully trained modules) agree between the layouts,
    in both LoRA forms (the activation form runs its 1x1 factors through ``_pointwise``'s channels-last path).

    Only the summation order differs. Tolerance per gradient tensor: 2e-3 of its own largest magnitude
    plus 2e-6 of the largest gradient anywhere (G, about 15 here). fp32 rounds at 6e-8 relative per
    operation; the deepest sums (a 3x3 conv's weight gradient over 2 images of 64x64, up to
    128*9*32*32 = 1.2e6 terms) and about 60 layers of backward put the layout-to-layout difference at
    1e-6..1e-4 of a tensor's scale. The second term is for gradients that are zero in exact arithmetic
    (some BatchNorm biases: 1e-11..1e-7 here): they hold only rounding noise of the backward's large
    values. Measured: at most 0.15 of the allowance, in either form. A wrong layout conversion
    errs by order 1.
    """
    monkeypatch.setattr(lorakit.handler_for(nn.Conv2d), "mode", form)
    model = _lora_detector()
    g = torch.Generator().manual_seed(0)
    n = 2
    batch = {
        "img": torch.rand(n, 3, 64, 64, generator=g),
        "cls": torch.randint(0, 3, (n * 2, 1), generator=g).float(),
        "bboxes": torch.rand(n * 2, 4, generator=g) * 0.5 + 0.25,
        "batch_idx": torch.arange(n).repeat_interleave(2).float(),
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_ref, ref = _grads(model, batch)
    model.load_state_dict(state)  # BatchNorm's running statistics moved in that step
    params = dict(model.named_parameters())
    assert layout.to_channels_last(model) is model
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects: an optimizer keeps them
    assert params["model.1.conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not params["model.1.conv.weight"].is_contiguous()
    loss, got = _grads(model, batch)
    assert got.keys() == ref.keys() and len(got) > 100
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    big = max(v.abs().max().item() for v in ref.values())
    excess = {k: ((got[k] - ref[k]).abs().max() / (2e-3 * ref[k].abs().max() + 2e-6 * big)).item() for k in ref}
    worst = max(excess, key=excess.__getitem__)
    assert excess[worst] <= 1, f"{worst}: {excess[worst]:.3g} of the allowance"


def test_usual_layout_gives_the_usual_layout_inside_and_the_same_tensors_after() -> None:
    """As Ultralytics' EMA does, views of the weights are taken before a save and updated after it:
    they must still be the model's weights, and a write inside the block must stay."""
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with layout.usual_layout(model):  # nothing channels-last: nothing to do
        assert model[0].weight.is_contiguous()
    layout.to_channels_last(model)
    assert not model[0].weight.is_contiguous()
    views = [v for v in model.state_dict().values() if v.dim() == 4]  # detached views, as ModelEMA keeps them
    with layout.usual_layout(model) as same:
        assert same is model
        assert all(v.is_contiguous() for v in model.state_dict().values())
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] = 7.0  # as Ultralytics' save_model resyncs a non-finite EMA tensor
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert float(model[0].weight[0, 0, 0, 0]) == 7.0
    with torch.no_grad():
        for v in views:
            v.add_(1.0)  # an EMA update after the save, through the old views
    after = model.state_dict()
    expected = before["0.weight"] + 1
    expected[0, 0, 0, 0] = 8.0
    assert torch.equal(after["0.weight"], expected) and torch.equal(after["2.weight"], before["2.weight"] + 1)
    assert all(torch.equal(v, before[k]) for k, v in after.items() if v.dim() != 4)


def test_pointwise_on_channels_last_input_is_the_1x1_convolution() -> None:
    """The channels-last branch of ``_pointwise`` (one ``linear`` over all pixels): forward and both
    gradients equal ``conv2d``'s up to fp32 summation order (16 terms: 1e-6 relative is ample)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 5, 7, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(8, 16, 1, 1, generator=g, requires_grad=True)
    dy = torch.randn(3, 8, 5, 7, generator=g)
    y = _pointwise(w, x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    y_ref = F.conv2d(x, w)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_the_setting_is_ultralytics_channels_last_and_auto_means_an_x86_linux_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import platform

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert layout.wanted(True, gpu) and layout.wanted(True, cpu)
    assert not layout.wanted(False, cpu) and not layout.wanted(False, gpu)
    assert not layout.wanted(None, gpu)  # on CUDA Ultralytics converts the model itself
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert layout.wanted(None, cpu) == bool(torch.backends.mkldnn.is_available())
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not layout.wanted(None, cpu)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert not layout.wanted(None, cpu)


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "frozen_before"), [(None, False), (False, True), (True, False)])
def test_a_plain_trainer_with_the_speedups_trains_as_set_and_saves_the_usual_layout(
    tmp_path: Path, setting: bool | None, frozen_before: bool
) -> None:
    """What ``compare`` does for its full/partial/head strategies: Ultralytics' own trainer, two epochs,
    channels-last where the run's ``channels_last`` (Ultralytics' key) and this CPU say so; the heap
    frozen while it trains and given back after, unless something else had frozen objects already.
    ``channels_last=True`` on a CPU is applied, without Ultralytics' log line saying it is ignored."""
    import gc
    import logging

    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer
    from yolo_helpers import TINY_TRAIN, checkpoint, save_random_detector

    from lorakit.yolo import make_dataset
    from lorakit.yolo.speed import with_speedups

    data = make_dataset(tmp_path / "data", domain="B", n_train=8, n_val=4, imgsz=64, seed=1)
    model = YOLO(str(save_random_detector(tmp_path / "base.pt", seed=0)))
    cls = with_speedups(DetectionTrainer)
    assert issubclass(cls, DetectionTrainer) and cls.__name__ == "FastDetectionTrainer"
    frozen_while_training: list[int] = []
    model.add_callback("on_train_epoch_start", lambda _: frozen_while_training.append(gc.get_freeze_count()))
    # conv weights of the live model and of its EMA at each save: where a live weight moved after the first
    # save, its EMA (a running average towards it) must have moved too
    saved: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def on_save(t: Any) -> None:
        live, ema = ([p.detach().clone() for p in m.parameters() if p.dim() == 4] for m in (t.model, t.ema.ema))
        saved.append((live, ema))

    model.add_callback("on_model_save", on_save)
    assert gc.get_freeze_count() == 0
    if frozen_before:
        gc.freeze()
    before = gc.get_freeze_count()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ultralytics").addHandler(handler)
    try:
        model.train(
            trainer=cls, data=str(data), epochs=2, imgsz=64, channels_last=setting, project=str(tmp_path), **TINY_TRAIN
        )
        after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
        logging.getLogger("ultralytics").removeHandler(handler)
    assert model.trainer.args.channels_last is setting
    assert len(saved) == 2
    (live0, ema0), (live1, ema1) = saved
    moved = [i for i, (a, b) in enumerate(zip(live0, live1, strict=True)) if not torch.equal(a, b)]
    assert len(moved) > 50
    assert [i for i in moved if torch.equal(ema0[i], ema1[i])] == []
    assert not [line for line in lines if "only supported on CUDA" in line], lines
    if frozen_before:  # someone else's freeze: left frozen, nothing added (frozen objects that die leave it)
        assert all(0 < n <= before for n in frozen_while_training) and 0 < after <= before
    else:
        assert all(n > 100_000 for n in frozen_while_training) and after == 0
    convs = [p for p in model.trainer.model.parameters() if p.dim() == 4]
    channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    usual = all(p.is_contiguous() for p in convs)
    assert (channels_last and not usual) if layout.wanted(setting, torch.device("cpu")) else usual
    for pt in (model.trainer.last, model.trainer.best):
        assert all(v.is_contiguous() for v in checkpoint(pt)["model"].state_dict().values())
