"""Adapters on a loaded base: ``LoraYOLO(base, adapter=...)``, switching, disabling, merged files.

Two adapters are trained on one random-weight 2-class yolo26n base with the default
``adapt_bn=True`` (BatchNorm weights and statistics live in the adapter): ``same``
on domain A (2 classes) and ``new`` on domain B (3 classes: new class convs). Both
runs give ``r=4`` to ``train()`` (the constructor's ``r=8`` is overridden), and what
``train()`` prints is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from yolo_helpers import TINY_TRAIN, assert_no_lorakit_class, final_outputs, save_random_detector

import lorakit

pytestmark = pytest.mark.slow
IMGSZ = 64
TRAIN = {"imgsz": IMGSZ, "epochs": 1, **TINY_TRAIN}


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from lorakit.yolo import LoraYOLO, make_dataset

    root = tmp_path_factory.mktemp("serving")
    save_random_detector(root / "base.pt", seed=0)
    save_random_detector(root / "other_base.pt", seed=1)
    out = SimpleNamespace(root=root, pt=root / "base.pt", other_pt=root / "other_base.pt")
    for name, domain, seed in (("same", "A", 0), ("new", "B", 1)):
        data = make_dataset(root / domain, domain=domain, n_train=16, n_val=8, imgsz=IMGSZ, seed=seed)
        model = LoraYOLO(str(out.pt), r=8)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            # r=4 here overrides the constructor's r=8; one run with Ultralytics' plots on (they must work
            # with LoRA, offline)
            # the "new" run leaves the early layers frozen (frozen_stride=4; the default adapts them)
            extra = {"frozen_stride": 4, "plots": True} if name == "new" else {"plots": False}
            model.train(data=str(data), project=str(root / "runs"), name=name, r=4, **{**TRAIN, **extra})
        t = model.trainer
        ema = t.ema.ema.float().eval()
        run = SimpleNamespace(
            adapter=t.best_adapter, model=t.model, ema=ema, best=t.best, dir=t.save_dir, printed=printed.getvalue()
        )
        setattr(out, name, run)
    return out


def test_base_plus_adapter_reproduces_the_trained_model(runs: SimpleNamespace) -> None:
    from lorakit.yolo import LoraYOLO

    for name in ("same", "new"):
        run = getattr(runs, name)
        m = LoraYOLO(str(runs.pt), adapter=run.adapter)
        assert m.adapters == [f"{name}-best"] and m.active_adapter == f"{name}-best"  # named after the run
        live = m.model.eval()
        x = _x()
        torch.testing.assert_close(final_outputs(live, x), final_outputs(run.ema, x), atol=1e-5, rtol=1e-5)
        # BatchNorm statistics came from the adapter: the base's differ, so this is not vacuous (the first
        # BN past the early layers, which stay the base's: test_early_layers_stay_exactly_the_base)
        bn = next(p for p, mod in live.named_modules() if isinstance(mod, nn.BatchNorm2d) and p.startswith("model.3."))
        base_bn = LoraYOLO(str(runs.pt)).model.get_submodule(bn)
        assert not torch.equal(live.get_submodule(bn).running_mean, base_bn.running_mean)
        torch.testing.assert_close(final_outputs(m.merged_model(), x), final_outputs(run.ema, x), atol=1e-4, rtol=1e-4)


def test_early_layers_stay_exactly_the_base(runs: SimpleNamespace) -> None:
    """``frozen_stride=4`` (the "new" run): yolo26n's ``model.0``-``model.2`` get no LoRA and their
    BatchNorm neither trains nor updates its statistics (the backward pass ends before them), in
    the trained model and its EMA, and the adapter file holds nothing of them. The default run
    ("same") trained them."""
    from safetensors import safe_open

    from lorakit.yolo import LoraYOLO
    from lorakit.yolo.targets import early_layers

    base = LoraYOLO(str(runs.pt)).model
    early = early_layers(base, 4)
    assert early == ["model.0", "model.1", "model.2"]
    ref = {k: v for k, v in base.state_dict().items() if k.startswith(tuple(f"{e}." for e in early))}
    assert any(k.endswith("bn.running_var") for k in ref)
    for model in (runs.new.model, runs.new.ema):
        sd = model.state_dict()
        assert [k for k in ref if not torch.equal(sd[k], ref[k])] == []
    with safe_open(str(runs.new.adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    stored = [k for k in names if re.search(r"(^|\.)model\.[0-2]\.", k)]
    assert stored == [], stored
    # the next layer's BatchNorm did train (not a run where nothing moved), and the default run
    # trained the early ones too
    for run, bn in ((runs.new, "model.3.bn.running_mean"), (runs.same, "model.1.bn.running_mean")):
        assert not torch.equal(run.model.state_dict()[bn], base.state_dict()[bn]), bn


def test_switch_between_adapters_on_one_base(runs: SimpleNamespace) -> None:
    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt))
    m.load_adapter(runs.same.adapter, name="same")
    m.load_adapter(runs.new.adapter, name="new", activate=False)
    assert m.adapters == ["same", "new"] and m.active_adapter == "same"
    x = _x(1)
    first = {}
    for name in ("same", "new", "same", "new"):
        m.set_adapter(name)
        run = getattr(runs, name)
        y = final_outputs(m.model.eval(), x)
        torch.testing.assert_close(y, final_outputs(run.ema, x), atol=1e-5, rtol=1e-5)
        if name in first:
            assert torch.equal(first[name], y)  # switching back gives the same model bitwise
        first[name] = y
        assert m.merged_model().names == run.ema.names
        res = m.predict(x[:1], imgsz=IMGSZ, verbose=False)
        assert res[0].names == run.ema.names
    assert len(m.names) == 3 and len(LoraYOLO(str(runs.pt)).names) == 2


def test_disabled_gives_the_base_predictions_exactly(runs: SimpleNamespace) -> None:
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt), adapter=runs.new.adapter)
    base = YOLO(str(runs.pt))
    x = _x(2)
    ref = base.predict(x, imgsz=IMGSZ, conf=0.0, verbose=False)
    with m.adapter_disabled():
        got = m.predict(x, imgsz=IMGSZ, conf=0.0, verbose=False)
        assert torch.equal(final_outputs(m.model.eval(), x), final_outputs(base.model.float().eval(), x))
    on = m.predict(x, imgsz=IMGSZ, conf=0.0, verbose=False)
    assert len(ref) == len(got) == len(on) == 2
    for r_ref, r_got, r_on in zip(ref, got, on, strict=True):
        assert r_got.names == r_ref.names
        assert torch.equal(r_got.boxes.data, r_ref.boxes.data)
        assert not torch.equal(r_on.boxes.data, r_ref.boxes.data)


def test_save_merged_is_a_plain_checkpoint(runs: SimpleNamespace, tmp_path: Path) -> None:
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt), adapter=runs.new.adapter)
    f = m.save_merged(tmp_path / "merged.pt")
    assert_no_lorakit_class(f)
    plain = YOLO(str(f))
    assert not any(isinstance(mod, lorakit.LoraLayer) for mod in plain.model.modules())
    assert plain.names == runs.new.ema.names
    x = _x(3)
    # the file is fp16, as Ultralytics saves every checkpoint
    torch.testing.assert_close(
        final_outputs(plain.model.float().eval(), x), final_outputs(runs.new.ema, x), atol=2e-2, rtol=2e-2
    )


def test_delete_and_bad_input_leave_the_model_unchanged(runs: SimpleNamespace) -> None:
    from lorakit.io_errors import BaseModelMismatchError
    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt), adapter=runs.same.adapter)
    x = _x(4)
    before = final_outputs(m.model.eval(), x)
    with pytest.raises(lorakit.ConfigError, match="loaded already"):
        m.load_adapter(runs.new.adapter, name="same-best")
    with pytest.raises(lorakit.AdapterNotFoundError):
        m.set_adapter("nope")
    with pytest.raises(lorakit.ConfigError, match="adapters are loaded"):
        m.train(data="unused.yaml")
    assert torch.equal(final_outputs(m.model.eval(), x), before) and m.adapters == ["same-best"]

    other = LoraYOLO(str(runs.other_pt))
    ref = final_outputs(other.model.eval(), x)
    state = deepcopy(other.model.state_dict())
    with pytest.raises(BaseModelMismatchError):
        other.load_adapter(runs.new.adapter)
    assert other.adapters == [] and torch.equal(final_outputs(other.model.eval(), x), ref)
    assert other.model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in other.model.state_dict().items())

    # a failed load while another adapter is active leaves that adapter, its head and its outputs as they were
    other.load_adapter(runs.same.adapter, name="same", allow_other_base=True)
    with_same = final_outputs(other.model.eval(), x)
    names = dict(other.names)
    with pytest.raises(BaseModelMismatchError):
        other.load_adapter(runs.new.adapter)  # 3 classes: its head would replace the active one's
    assert other.adapters == ["same"] and other.active_adapter == "same" and other.names == names
    assert torch.equal(final_outputs(other.model.eval(), x), with_same)

    m.delete_adapter("same-best")
    assert m.adapters == [] and m.active_adapter is None
    base = LoraYOLO(str(runs.pt))
    assert torch.equal(final_outputs(m.model.eval(), x), final_outputs(base.model.eval(), x))


def test_ultralytics_logs_and_plots_work_with_lora(runs: SimpleNamespace) -> None:
    made = {p.name for p in runs.new.dir.iterdir()}
    assert {"results.csv", "results.png", "confusion_matrix.png", "labels.jpg", "train_batch0.jpg"} <= made
    rows = (runs.new.dir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + TRAIN["epochs"] and "metrics/mAP50-95(B)" in rows[0]


def test_an_unfit_head_is_refused_before_anything_changes(runs: SimpleNamespace, tmp_path: Path) -> None:
    import json
    import shutil

    import safetensors
    import safetensors.torch

    from lorakit.io_format import checksum
    from lorakit.yolo import LoraYOLO

    bad = tmp_path / "bad_head"
    shutil.copytree(runs.new.adapter, bad)
    weights = bad / "adapter_model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata())
    tensors = safetensors.torch.load_file(str(weights))
    key = next(k for k in tensors if k.endswith("cv3.0.2.weight") and ".lora" not in k)
    out, cin = tensors[key].shape[:2]
    tensors[key] = torch.randn(out, cin + 1, 1, 1)  # a class conv reading other features: not this base's head
    sums = json.loads(meta["lorakit_checksums"])
    sums[key] = checksum(tensors[key])
    meta["lorakit_checksums"] = json.dumps(sums, sort_keys=True)
    safetensors.torch.save_file(tensors, str(weights), metadata=meta)

    m = LoraYOLO(str(runs.pt), adapter=runs.same.adapter)
    x = _x(5)
    before, names = final_outputs(m.model.eval(), x), dict(m.names)
    with pytest.raises(lorakit.ConfigError, match="only the output count"):
        m.load_adapter(bad)
    assert m.adapters == ["same-best"] and m.active_adapter == "same-best" and m.names == names
    assert torch.equal(final_outputs(m.model.eval(), x), before)


def test_train_takes_lora_settings_and_says_where_the_files_are(runs: SimpleNamespace) -> None:
    """Issue 13 item 4: ``LoraYOLO(...).train(r=4)`` was refused by Ultralytics ("'r' is not a valid
    YOLO argument"), and ``train()`` said nothing about where the adapter and merged weights went."""
    for run in (runs.same, runs.new):
        config = json.loads((run.adapter / "adapter_config.json").read_text())
        assert config["r"] == 4  # train's r=4, not the constructor's r=8
        weights = run.dir / "weights"
        for path in (weights / "best.pt", weights / "last.pt", weights / "best_adapter", weights / "last_adapter"):
            assert path.exists() and str(path) in run.printed, run.printed


def test_lora_settings_with_resume_are_refused(runs: SimpleNamespace) -> None:
    from lorakit.yolo import LoraYOLO

    with pytest.raises(lorakit.ConfigError, match=r"resume=True.*\['r'\]"):
        LoraYOLO(str(runs.pt)).train(resume=True, r=4)


def test_two_runs_best_adapters_get_distinct_default_names(runs: SimpleNamespace) -> None:
    """Issue 13 item 8: every run's adapter folder is ``weights/best_adapter``, so loading two runs'
    adapters without names clashed ("an adapter named 'best_adapter' is loaded already")."""
    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt))
    m.load_adapter(runs.same.adapter)
    m.load_adapter(runs.new.adapter)
    assert m.adapters == ["same-best", "new-best"] and m.active_adapter == "new-best"


def test_export_with_an_adapter_is_named_after_the_adapter(runs: SimpleNamespace) -> None:
    """Issue 13 item 9: ``LoraYOLO(base, adapter=...).export()`` wrote ``base.onnx`` next to the base,
    the plain base's own export name; it is named after the adapter folder, as the CLI's export."""
    from lorakit.yolo import LoraYOLO

    m = LoraYOLO(str(runs.pt), adapter=runs.same.adapter)
    exported = Path(m.export(format="onnx", imgsz=IMGSZ, device="cpu"))
    assert exported == runs.same.adapter.parent / "best_adapter.onnx" and exported.is_file()
    assert not (runs.root / "base.onnx").exists()
