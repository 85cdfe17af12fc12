"""End to end: LoRA training of yolo26n (built from YAML) on synthetic data, imgsz 64.

One run per module fixture: ``same_nc`` fine-tunes a 2-class base on domain A
(2 classes, so every base weight is transferred); ``new_nc`` fine-tunes it on
domain B (3 classes: the class convs are re-initialised and trained fully).
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from yolo_helpers import TINY_TRAIN, checkpoint, layer_outputs, save_random_detector, start_snapshot, with_run_args

import lorakit
from lorakit.yolo import layout
from lorakit.yolo.layout import usual_layout

pytestmark = pytest.mark.slow
IMGSZ = 64
TRAIN = {"imgsz": IMGSZ, **TINY_TRAIN}


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A random-weight 2-class yolo26n saved as a .pt (stands in for pretrained weights) and both datasets."""
    from lorakit.yolo import make_dataset

    root = tmp_path_factory.mktemp("yolo_run")
    save_random_detector(root / "base.pt", seed=0)
    return SimpleNamespace(
        root=root,
        pt=root / "base.pt",
        data_a=make_dataset(root / "A", domain="A", n_train=16, n_val=8, imgsz=IMGSZ, seed=0),
        data_b=make_dataset(root / "B", domain="B", n_train=16, n_val=8, imgsz=IMGSZ, seed=1),
    )


def _train(base: SimpleNamespace, data: Path, name: str, epochs: int, **lora: Any) -> SimpleNamespace:
    from lorakit.yolo import LoraYOLO

    start: dict[str, Any] = {}

    # BatchNorm frozen (adapt_bn=False): the invariants below (base bitwise unchanged, only LoRA factors
    # train, disabled == base) are those of that mode; the default (adapt_bn=True) runs in test_demo.py.
    model = LoraYOLO(str(base.pt), r=8, adapt_bn=False, **lora)
    model.add_callback("on_pretrain_routine_end", start_snapshot(start))
    model.train(data=str(data), epochs=epochs, project=str(base.root / "runs"), name=name, **TRAIN)
    return SimpleNamespace(model=model, trainer=model.trainer, start=start)


@pytest.fixture(scope="module")
def same_nc(base: SimpleNamespace) -> SimpleNamespace:
    return _train(base, base.data_a, "same_nc", epochs=2)


@pytest.fixture(scope="module")
def new_nc(base: SimpleNamespace) -> SimpleNamespace:
    return _train(base, base.data_b, "new_nc", epochs=1, measure_forms=True, loraplus_ratio=16)


def _base_model(base: SimpleNamespace) -> nn.Module:
    from ultralytics import YOLO

    return YOLO(str(base.pt)).model.float().eval()


def _is_lora_key(k: str) -> bool:
    return ".lora." in k


def test_base_weights_and_bn_buffers_bitwise_unchanged(base: SimpleNamespace, same_nc: SimpleNamespace) -> None:
    ref = _base_model(base).state_dict()
    for model in (same_nc.trainer.model, same_nc.trainer.ema.ema):
        sd = model.state_dict()
        base_keys = [k for k in sd if not _is_lora_key(k)]
        assert set(base_keys) == set(ref)
        changed = [k for k in base_keys if not torch.equal(sd[k], ref[k])]
        assert changed == []
    bn = [k for k in ref if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn) == 3 * 114  # every BN buffer was compared above


def test_only_adapter_params_train(same_nc: SimpleNamespace) -> None:
    t, start = same_nc.trainer, same_nc.start
    lora_names = {n for n, _ in t.model.named_parameters() if _is_lora_key(n) and n.endswith((".A", ".B"))}
    assert start["requires_grad"] == lora_names
    assert {start["names"][i] for i in start["optimized"]} == lora_names
    sd = t.model.state_dict()
    changed = {k for k, v in start["state"].items() if not torch.equal(sd[k], v)}
    assert changed and changed <= lora_names
    # Every adapter trained, except that at imgsz 64 the one-to-one box branch of the coarser levels
    # may be assigned no object (one2one matches one anchor per box) and so gets no gradient.
    b_still = sorted(n for n in lora_names if n.endswith(".B") and n not in changed)
    assert all(".one2one_cv2.1." in n or ".one2one_cv2.2." in n for n in b_still), b_still
    assert any(".one2one_cv2." in n for n in changed)
    assert t.lora_report.trainable == sum(p.numel() for n, p in t.model.named_parameters() if n in lora_names)


def test_merged_equals_unmerged_and_checkpoint_is_the_merged_ema(same_nc: SimpleNamespace) -> None:
    t = same_nc.trainer
    x = _x()
    trained = deepcopy(t.ema.ema).float().eval()
    # Two tiny epochs move B only a little, so also check an adapter with large random factors:
    # there a merge error would show far above the 1e-4 tolerance.
    strong = deepcopy(trained)
    gen = torch.Generator().manual_seed(0)
    for name, p in strong.named_parameters():
        if name.endswith(".lora.default.B"):
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    for lora_model, min_effect in ((trained, 1e-4), (strong, 1e-2)):
        with torch.no_grad():
            y = layer_outputs(lora_model, x)
            with lorakit.disabled(lora_model):
                y_base = layer_outputs(lora_model, x)
            merged = lorakit.merge_and_unload(deepcopy(lora_model))
            y_merged = layer_outputs(merged, x)
        assert (y - y_base).abs().max() > min_effect  # the adapter does something
        torch.testing.assert_close(y_merged, y, atol=1e-4, rtol=1e-4)
        assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    # last.pt holds exactly the merged EMA (in fp16)
    merged = lorakit.merge_and_unload(deepcopy(trained))
    ckpt = torch.load(t.last, map_location="cpu", weights_only=False)
    saved = ckpt["model"].state_dict()
    ref = {k: v.half() if v.is_floating_point() else v for k, v in merged.state_dict().items()}
    assert saved.keys() == ref.keys()
    assert all(torch.equal(saved[k], ref[k]) for k in ref)


def test_disabled_adapter_reproduces_base_exactly(base: SimpleNamespace, same_nc: SimpleNamespace) -> None:
    base_model = _base_model(base)
    x = _x(1)
    with torch.no_grad():
        y_ref = layer_outputs(base_model, x)
        for model in (same_nc.trainer.model, same_nc.trainer.ema.ema):
            model.eval()
            # trained channels-last (a CPU run); in the base's layout the convolutions round as the base's do
            with usual_layout(model), lorakit.disabled(model):
                assert torch.equal(layer_outputs(model, x), y_ref)
            assert not torch.equal(layer_outputs(model, x), y_ref)


def test_checkpoints_load_without_lorakit(same_nc: SimpleNamespace, plain_ultralytics: Any) -> None:
    t = same_nc.trainer
    assert t.best.exists() and t.last.exists()
    # on an x86 Linux CPU a run trains channels-last (lorakit.yolo.layout) ...
    convs = [p for p in t.model.parameters() if p.dim() == 4]
    if layout.wanted(None, torch.device("cpu")):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert any(not p.is_contiguous() for p in convs)
    else:
        assert all(p.is_contiguous() for p in convs)
    for f in (t.best, t.last):  # merged: plain convs throughout
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        assert sum(type(m) is nn.Conv2d for m in ckpt["model"].modules()) > 100
        # ... and writes checkpoints in the usual layout (safetensors, for one, refuses anything else)
        assert all(v.is_contiguous() for v in ckpt["model"].state_dict().values())
    plain_ultralytics([t.best, t.last], imgsz=64)


def test_loraYOLO_holds_plain_merged_model(same_nc: SimpleNamespace) -> None:
    m = same_nc.model
    assert not any(isinstance(x, lorakit.LoraLayer) for x in m.model.modules())
    metrics = m.val(
        data=m.trainer.args.data, imgsz=IMGSZ, batch=8, workers=0, plots=False, verbose=False,
        project=str(m.trainer.save_dir.parent), name="val",
    )  # fmt: skip
    assert metrics.box.map50 >= 0.0
    assert len(m.predict(torch.rand(1, 3, IMGSZ, IMGSZ), imgsz=IMGSZ, verbose=False)) == 1


def test_onnx_export_matches_torch(same_nc: SimpleNamespace) -> None:
    import numpy as np
    import onnxruntime as ort

    m = same_nc.model
    f = m.export(format="onnx", imgsz=IMGSZ)
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    x = _x(2)[:1]
    (y_onnx,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch_model = deepcopy(m.model).float().eval().fuse(verbose=False)
    with torch.no_grad():
        y_torch = torch_model(x)[0].numpy()
    assert y_onnx.shape == y_torch.shape == (1, 4 + 2, 84)
    np.testing.assert_allclose(y_onnx, y_torch, atol=1e-4, rtol=1e-4)


def test_adapter_files(tmp_path: Path, base: SimpleNamespace, same_nc: SimpleNamespace) -> None:
    t, m = same_nc.trainer, same_nc.model
    assert t.best_adapter.is_dir() and t.last_adapter.is_dir()
    out = m.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in m.adapter_dir.iterdir())
    (out / "adapter_model.safetensors").write_bytes(b"stale")  # saving again replaces every file
    m.save_adapter(out)
    for f in m.adapter_dir.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    from lorakit.io import load_adapter, read_adapter_files

    fresh = _base_model(base)  # load_adapter injects the saved config, then copies the tensors
    load_adapter(fresh, t.last_adapter)
    ema = deepcopy(t.ema.ema).float().eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer_outputs(fresh, _x()), layer_outputs(ema, _x()), atol=1e-5, rtol=1e-5)
    files = read_adapter_files(t.last_adapter)
    # the run fingerprints the frozen live base once; the file says what reading the saved EMA's base says
    from lorakit.io import base_fingerprints

    assert json.loads(files.metadata["lorakit_base"]) == json.loads(json.dumps(base_fingerprints(t.ema.ema)))
    meta = json.loads(files.metadata["lorakit_yolo"])
    names = {"0": "rectangle", "1": "circle"}  # and the run's data and imgsz, for merged checkpoints
    assert meta == {"task": "detect", "names": names, "data": str(base.data_a), "imgsz": IMGSZ}


def test_new_class_count_trains_class_convs_fully(base: SimpleNamespace, new_nc: SimpleNamespace) -> None:
    from lorakit.yolo.targets import class_convs

    t, start = new_nc.trainer, new_nc.start
    heads = class_convs(t.model)
    assert len(heads) == 6 and t.lora_config is not None and set(t.lora_config.train_modules) == set(heads)
    head_params = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    lora_names = {n for n, _ in t.model.named_parameters() if n.endswith((".A", ".B")) and _is_lora_key(n)}
    assert start["requires_grad"] == lora_names | head_params
    sd = t.model.state_dict()
    changed = {k for k, v in start["state"].items() if not torch.equal(sd[k], v)}
    assert head_params <= changed <= lora_names | head_params
    for h in heads:
        conv = t.model.get_submodule(h)
        assert type(conv) is nn.Conv2d and conv.out_channels == 3
    ref = _base_model(base).state_dict()  # everything else is still the base
    for k, v in ref.items():
        if k not in head_params and not k.startswith(tuple(heads)):
            assert torch.equal(sd[k], v), k


def test_merged_checkpoints_carry_the_adapter_runs_data_and_say_they_are_merges(
    base: SimpleNamespace, new_nc: SimpleNamespace, tmp_path: Path
) -> None:
    """Issue 13 item 3: a merged checkpoint kept the base run's ``train_args`` (its data set, domain A),
    so ``yolo val model=merged_B.pt`` validated on A with B's class names, and nothing said it was a
    merge. The run's best.pt/last.pt and ``save_merged`` must carry the adapter run's data (what
    ``YOLO(file)`` takes as its default ``data``), its class names, and a description naming adapter and base."""
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO
    from lorakit.yolo.data import DOMAINS

    t, data_b, names_b = new_nc.trainer, str(base.data_b), dict(enumerate(DOMAINS["B"]))
    for pt, adapter in ((t.best, t.best_adapter), (t.last, t.last_adapter)):
        ckpt = checkpoint(pt)
        assert ckpt["train_args"]["data"] == data_b, pt
        assert (
            ckpt["description"]
            == f"LoRA merge: adapter {adapter} merged into base {base.pt}; adapter trained on {data_b}"
        )
        assert YOLO(str(pt)).names == names_b

    # A base whose own run was on A, as a pre-trained base's checkpoint says; B's adapter merged into it.
    base_a = with_run_args(base.pt, tmp_path / "base_a.pt", data=str(base.data_a), imgsz=320)
    model = LoraYOLO(str(base_a), adapter=t.best_adapter)
    merged = model.save_merged(tmp_path / "merged_b.pt")
    ckpt = checkpoint(merged)
    assert (ckpt["train_args"]["data"], ckpt["train_args"]["imgsz"]) == (data_b, IMGSZ)
    assert ckpt["description"] == (
        f"LoRA merge: adapter {t.best_adapter} merged into base {base_a}; adapter trained on {data_b}"
    )
    plain = YOLO(str(merged))
    assert plain.names == names_b
    assert plain.overrides["data"] == data_b  # what `yolo val model=merged_b.pt` validates on
    assert checkpoint(base_a)["train_args"]["data"] == str(base.data_a)  # the base file is untouched

    with model.adapter_disabled():  # no adapter active: the file is the base, with the base's own settings
        again = checkpoint(model.save_merged(tmp_path / "base_again.pt"))
    assert again["train_args"]["data"] == str(base.data_a) and "description" not in again


def test_measure_forms_records_a_form_on_every_adapted_conv(new_nc: SimpleNamespace) -> None:
    from lorakit.layers import CONV_FORM_ATTR

    convs = [m for m in new_nc.trainer.model.modules() if isinstance(m, lorakit.LoraLayer)]
    assert len(convs) > 90
    assert all(m.__dict__.get(CONV_FORM_ATTR, ("", 0))[0] in ("weight", "activation") for m in convs)


def test_loraplus_scales_each_groups_B_factors_and_resume_keeps_the_ratio(
    new_nc: SimpleNamespace, tmp_path: Path
) -> None:
    from lorakit.yolo import resume

    t = new_nc.trainer
    b_ids = {id(ad.B) for _, layer in lorakit.lora_layers(t.model) for ad in layer.lora.values()}
    groups = t.optimizer.param_groups
    with_b = [g for g in groups if any(id(p) in b_ids for p in g["params"])]
    assert {id(p) for g in with_b for p in g["params"]} == b_ids  # B factors only, all of them
    others = {g["lr"] for g in groups if g not in with_b}
    assert len(others) == 1 and {g["lr"] for g in with_b} == {16 * others.pop()}  # the schedule kept the ratio
    resume.write_base(tmp_path, t.model)
    live, ema = t.changing_state(t.model), t.changing_state(t.ema.ema)
    resume.write_epoch(tmp_path, 3, live, ema, t.lora_config, "default", False, loraplus_ratio=16.0)
    assert resume.read(tmp_path / "last.pt", 3).loraplus_ratio == 16.0


def test_the_ema_averages_only_what_trains(same_nc: SimpleNamespace) -> None:
    """The frozen base is left out of Ultralytics' EMA update (exact: test_ema.py), BatchNorm buffers are not."""
    t = same_nc.trainer
    frozen = {n for n, p in t.model.named_parameters() if not p.requires_grad}
    ema = t.ema.ema.state_dict()
    want = {v.data_ptr() for k, v in ema.items() if v.is_floating_point() and k not in frozen}
    assert {v.data_ptr() for v in t.ema._pairs[0]} == want
    assert any(k.endswith("running_mean") and v.data_ptr() in want for k, v in ema.items())


def test_cpu_optimizer_steps_with_the_fused_kernel(same_nc: SimpleNamespace) -> None:
    """torch loops over tensors in Python on a CPU unless told otherwise; LoRA's many small tensors
    then cost more than full fine-tuning's step (yolo26n: 43 ms against 7 ms fused)."""
    groups = same_nc.trainer.optimizer.param_groups
    assert groups and all(g["fused"] is True and not g["foreach"] for g in groups)


def test_muon_refused(base: SimpleNamespace) -> None:
    from lorakit.yolo import LoraYOLO

    with pytest.raises(lorakit.ConfigError, match="MuSGD"):
        LoraYOLO(str(base.pt)).train(
            data=str(base.data_a), epochs=1, optimizer="MuSGD", project=str(base.root / "runs"), name="muon", **TRAIN
        )


class _Interrupt(Exception):
    pass


def _state(trainer: Any) -> dict[str, Any]:
    return {
        "live": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in trainer.ema.ema.state_dict().items()},
        "updates": trainer.ema.updates,
        "optimizer": deepcopy(trainer.optimizer.state_dict()),
        "start_epoch": trainer.start_epoch,
    }


def test_resume_continues_the_lora_run(base: SimpleNamespace) -> None:
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    saved: dict[str, Any] = {}

    def interrupt_after_first_epoch(trainer: Any) -> None:  # after last.pt and the LoRA state are written
        saved.update(_state(trainer))
        raise _Interrupt

    # default adapt_bn=True: BatchNorm weights and statistics are part of what must come back
    model = LoraYOLO(str(base.pt), r=4)
    model.add_callback("on_model_save", interrupt_after_first_epoch)
    with pytest.raises(_Interrupt):
        model.train(data=str(base.data_b), epochs=2, project=str(base.root / "runs"), name="resume", **TRAIN)
    last = model.trainer.last
    assert (last.parent / "lora_resume" / "epoch0.safetensors").is_file()

    restored: dict[str, Any] = {}
    resumed = LoraYOLO(str(last))
    resumed.add_callback("on_pretrain_routine_end", lambda t: restored.update(_state(t)))
    resumed.train(resume=True)
    assert restored["start_epoch"] == 1 and restored["updates"] == saved["updates"] > 0
    for part in ("live", "ema"):  # base weights, LoRA factors, BN statistics: all bitwise as they were
        assert restored[part].keys() == saved[part].keys()
        assert any(".lora." in k for k in saved[part])
        for k, v in saved[part].items():
            assert torch.equal(restored[part][k], v), (part, k)
    opt_saved, opt_restored = saved["optimizer"]["state"], restored["optimizer"]["state"]
    assert opt_saved.keys() == opt_restored.keys() and len(opt_saved) > 0
    for i, st in opt_saved.items():  # Ultralytics keeps step and Adam's moments in fp32 in last.pt
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_restored[i][key], st[key]), (i, key)
    t = resumed.trainer
    assert t.epoch == 1 and t.best_adapter.is_dir()
    assert not (t.wdir / "lora_resume").exists()  # finished: nothing left to resume
    assert not any(isinstance(m, lorakit.LoraLayer) for m in YOLO(str(t.last)).model.modules())


def test_a_save_that_dies_before_the_resume_state_leaves_no_last_pt_naming_it(base: SimpleNamespace) -> None:
    """The resume state is written before ``last.pt``: a run killed between them must not leave a
    ``last.pt`` whose epoch has no state (``resume=True`` would then refuse it). Here the state's
    write fails for real (a folder stands where its file goes) in the first epoch's save."""
    from lorakit.yolo import LoraYOLO

    def block_state_file(trainer: Any) -> None:
        (trainer.wdir / "lora_resume" / "epoch0.safetensors").mkdir(parents=True)

    model = LoraYOLO(str(base.pt), r=4)
    model.add_callback("on_pretrain_routine_end", block_state_file)
    with pytest.raises(OSError, match="epoch0.safetensors"):
        model.train(data=str(base.data_a), epochs=1, project=str(base.root / "runs"), name="dies", **TRAIN)
    assert not model.trainer.last.exists()


def test_resume_without_lora_state_is_a_clear_error(base: SimpleNamespace, tmp_path: Path) -> None:
    import shutil

    from lorakit.yolo import LoraYOLO

    def interrupt(trainer: Any) -> None:
        raise _Interrupt

    model = LoraYOLO(str(base.pt), r=4)
    model.add_callback("on_model_save", interrupt)
    with pytest.raises(_Interrupt):
        model.train(data=str(base.data_a), epochs=2, project=str(base.root / "runs"), name="no_state", **TRAIN)
    last = model.trainer.last
    shutil.rmtree(last.parent / "lora_resume")
    with pytest.raises(lorakit.ConfigError, match="base.safetensors is missing"):
        LoraYOLO(str(last)).train(resume=True)


def test_nan_loss_restores_the_last_saved_epoch(same_nc: SimpleNamespace) -> None:
    # Ultralytics would reload last.pt (merged weights, no LoRA keys) into the LoRA model and fail.
    t = same_nc.trainer
    good = t._last_good
    live = t.changing_state(t.model)
    assert good.taken and set(good.names) == set(live)
    saved = {k: v.clone() for k, v in live.items()}
    moments = [v for st in t.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    saved_moments = [v.clone() for v in moments]
    with torch.no_grad():
        for v in [*live.values(), *moments]:
            if v.is_floating_point():
                v.fill_(float("nan"))
    t.loss, t.fitness, attempts = torch.tensor(float("nan")), None, t.nan_recovery_attempts
    assert t._handle_nan_recovery(epoch=t.start_epoch + 1) is True
    assert t.nan_recovery_attempts == attempts + 1
    live = t.changing_state(t.model)
    assert all(torch.equal(live[k], v) for k, v in saved.items())
    restored = [v for st in t.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert len(restored) == len(saved_moments) and all(map(torch.equal, restored, saved_moments))
    ema = t.ema.ema.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in good.ema().items())
    assert t.ema.updates == good.updates
    t.loss = torch.tensor(1.0)
    assert t._handle_nan_recovery(epoch=t.start_epoch + 1) is False  # finite loss: nothing to do


@pytest.mark.parametrize("ultralytics_strip", ["takes updates", "other signature"])
def test_the_description_rides_on_ultralytics_final_rewrite_or_is_written_after_it(
    base: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, ultralytics_strip: str
) -> None:
    """Ultralytics' final_eval rewrites last.pt and best.pt (strip_optimizer); the description goes into
    that rewrite, with no second rewrite of its own. A strip_optimizer without a parameter named
    ``updates`` (another Ultralytics) is left alone, and the description written afterwards."""
    import ultralytics.engine.trainer as engine

    import lorakit.yolo.trainer as lora_trainer

    calls: list[Path] = []
    strip: Any = None
    slow_way = lora_trainer.describe_checkpoint
    monkeypatch.setattr(lora_trainer, "describe_checkpoint", lambda pt, text: (calls.append(pt), slow_way(pt, text)))
    if ultralytics_strip == "other signature":
        original = engine.strip_optimizer

        def strip(f: Any = "best.pt", s: str = "", **kwargs: Any) -> Any:  # no parameter named updates
            return original(f, s, **kwargs)

        monkeypatch.setattr(engine, "strip_optimizer", strip)
    run = _train(base, base.data_b, f"described-{ultralytics_strip.replace(' ', '-')}", 1)
    t = run.trainer
    for pt, adapter in ((t.best, t.best_adapter), (t.last, t.last_adapter)):
        assert checkpoint(pt)["description"].startswith(f"LoRA merge: adapter {adapter} merged into base {base.pt}")
    assert calls == ([] if ultralytics_strip == "takes updates" else [t.last, t.best])
    # the trainer put Ultralytics' own function back
    from ultralytics.utils.torch_utils import strip_optimizer

    assert engine.strip_optimizer is (strip_optimizer if ultralytics_strip == "takes updates" else strip)
