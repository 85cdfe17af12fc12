"""End to end: LoRA training of YOLO26n segment, pose, OBB and classify models through Ultralytics' task trainers.

Each base is a random-weight 2-class model built from Ultralytics' shipped YAML and
saved as a .pt (it stands in for pretrained weights), trained for one epoch on the
synthetic domain-A set of its task (2 classes, so every base weight is transferred)
with BatchNorm frozen (``adapt_bn=False``), the mode whose invariants these are.
``new_nc`` fine-tunes the segment base on domain B (3 classes): the class convs and
the semantic-segmentation output are re-initialised and trained fully.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from yolo_helpers import TINY_TRAIN, layer_outputs, start_snapshot

import lorakit
from lorakit.yolo.layout import usual_layout

pytestmark = pytest.mark.slow
TASKS = ("segment", "pose", "obb", "classify")
YAMLS = {t: f"yolo26n-{s}.yaml" for t, s in (("segment", "seg"), ("pose", "pose"), ("obb", "obb"), ("classify", "cls"))}
IMGSZ = {"segment": 64, "pose": 64, "obb": 64, "classify": 32}
# nbs=batch and no warmup: every batch is an optimizer step at full lr (else 2 batches make ~0 steps)
TRAIN = {"epochs": 1, **TINY_TRAIN}


def _x(task: str, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ[task], IMGSZ[task], generator=torch.Generator().manual_seed(seed))


def _build(task: str, nc: int) -> nn.Module:
    from ultralytics.nn.tasks import ClassificationModel, OBBModel, PoseModel, SegmentationModel

    from lorakit.yolo.data_tasks import KPT_SHAPE

    cfg = YAMLS[task]
    if task == "pose":
        return PoseModel(cfg, nc=nc, data_kpt_shape=KPT_SHAPE, verbose=False)
    cls = {"segment": SegmentationModel, "obb": OBBModel, "classify": ClassificationModel}[task]
    return cls(cfg, nc=nc, verbose=False)


class Lab:
    """Bases, datasets and trained runs, each made once on first use (module-scoped)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, Path] = {}
        self._runs: dict[tuple[str, str], SimpleNamespace] = {}

    def base_pt(self, task: str) -> Path:
        if task not in self._bases:
            from ultralytics import YOLO

            torch.manual_seed(0)
            y = YOLO(YAMLS[task])
            y.model = _build(task, nc=2)
            y.model.task = task  # as YOLO(yaml) sets it; loading the .pt would otherwise guess "detect"
            self._bases[task] = self.root / f"base-{task}.pt"
            y.save(self._bases[task])
        return self._bases[task]

    def base_model(self, task: str) -> nn.Module:
        from ultralytics import YOLO

        return YOLO(str(self.base_pt(task))).model.float().eval()

    def run(self, task: str, domain: str = "A") -> SimpleNamespace:
        if (task, domain) not in self._runs:
            self._runs[task, domain] = self._train(task, domain)
        return self._runs[task, domain]

    def _train(self, task: str, domain: str) -> SimpleNamespace:
        from ultralytics import YOLO

        from lorakit.yolo import LoraOptions, make_task_dataset, trainer_for

        data = make_task_dataset(
            self.root / f"data-{task}-{domain}", task=task, domain=domain, n_train=16, n_val=8, imgsz=IMGSZ[task]
        )
        start: dict[str, Any] = {}

        y = YOLO(str(self.base_pt(task)))
        assert y.task == task
        y.add_callback("on_pretrain_routine_end", start_snapshot(start))
        trainer = partial(trainer_for(task), lora=LoraOptions(r=8, adapt_bn=False))
        name = f"{task}-{domain}"
        y.train(data=str(data), trainer=trainer, imgsz=IMGSZ[task], project=str(self.root / "runs"), name=name, **TRAIN)
        return SimpleNamespace(task=task, yolo=y, trainer=y.trainer, start=start)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(tmp_path_factory.mktemp("yolo_tasks"))


def _lora_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora." in n and n.endswith((".A", ".B"))}


def _under(key: str, modules: tuple[str, ...]) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def test_trainer_for_every_task() -> None:
    from ultralytics.models.yolo.classify import ClassificationTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.models.yolo.obb import OBBTrainer
    from ultralytics.models.yolo.pose import PoseTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer

    from lorakit.yolo import trainer_for
    from lorakit.yolo.trainer import LoraTrainerMixin

    bases = {"detect": DetectionTrainer, "segment": SegmentationTrainer, "pose": PoseTrainer}
    bases |= {"obb": OBBTrainer, "classify": ClassificationTrainer}
    for task, base in bases.items():
        cls = trainer_for(task)
        assert issubclass(cls, LoraTrainerMixin) and issubclass(cls, base)
        assert cls.__mro__.index(LoraTrainerMixin) < cls.__mro__.index(base)  # the mixin's overrides come first
    with pytest.raises(NotImplementedError, match="semantic"):
        trainer_for("semantic")


@pytest.mark.parametrize("task", TASKS)
def test_head_modules_per_task(task: str) -> None:
    from lorakit.yolo.targets import class_convs, head_modules

    model = _build(task, nc=2)
    heads = head_modules(model, task)
    mods = dict(model.named_modules())
    assert heads and all(p in mods for p in heads)
    if task == "classify":
        assert heads == ["model.10.linear"] and mods[heads[0]].out_features == 2
        return
    convs = class_convs(model)
    assert len(convs) == 6 and heads[:6] == convs
    extra = heads[6:]
    if task == "segment":  # mask coefficients (nm=32) of both heads, and the semantic output (one per class)
        assert extra == [f"model.23.{h}.{i}.2" for h in ("cv4", "one2one_cv4") for i in range(3)] + [
            "model.23.proto.semseg.2"
        ]
        assert mods["model.23.proto.semseg.2"].out_channels == 2
    elif task == "obb":  # one angle per anchor
        assert extra == [f"model.23.{h}.{i}.2" for h in ("cv4", "one2one_cv4") for i in range(3)]
        assert all(mods[p].out_channels == 1 for p in extra)
    else:  # pose: every conv and BN of the keypoint branch (its width follows kpt_shape)
        assert "model.23.cv4.0.0.conv" in extra and "model.23.cv4.0.1.bn" in extra
        assert "model.23.cv4_kpts.2" in extra and "model.23.one2one_cv4_sigma.0" in extra
        assert mods["model.23.cv4_kpts.0"].out_channels == 5 * 3


def test_default_targets_on_the_classifier() -> None:
    from lorakit.yolo.targets import default_exclusions, detector_config

    model = _build("classify", nc=1000)
    report = lorakit.inject(deepcopy(model), detector_config(model, r=8))
    adapted = {t.name for t in report.targets}
    assert "model.10.linear" in adapted  # 1280 -> 1000: LoRA is 1.4 % of it
    assert "model.10.conv.conv" in adapted and "model.0.conv" not in adapted  # the stem is left out
    small = _build("classify", nc=2)
    assert "thin layer" in default_exclusions(small, 8)["model.10.linear"]  # 1280 -> 2: LoRA 4x its size


@pytest.mark.parametrize("task", TASKS)
def test_task_datasets_are_deterministic_and_well_formed(tmp_path: Path, task: str) -> None:
    import hashlib

    from lorakit.yolo import make_task_dataset
    from lorakit.yolo.data_tasks import KPT_SHAPE

    def digest(root: Path) -> str:
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix != ".yaml")  # yaml holds the path
        return hashlib.sha256(
            b"".join(f.relative_to(root).as_posix().encode() + f.read_bytes() for f in files)
        ).hexdigest()

    kw: dict[str, Any] = {"task": task, "domain": "B", "n_train": 6, "n_val": 3, "imgsz": 64, "seed": 3}
    a, b = make_task_dataset(tmp_path / "a", **kw), make_task_dataset(tmp_path / "b", **kw)
    other = make_task_dataset(tmp_path / "c", **{**kw, "seed": 4})
    root_a, root_b, root_c = (p if task == "classify" else p.parent for p in (a, b, other))
    assert digest(root_a) == digest(root_b) != digest(root_c)
    if task == "classify":
        assert a == root_a and sorted(d.name for d in (a / "val").iterdir()) == ["cross", "ellipse", "triangle"]
        assert len(list(a.glob("train/*/*.png"))) == 6
        return
    lines = [ln.split() for f in sorted((root_a / "labels").rglob("*.txt")) for ln in f.read_text().splitlines()]
    assert lines and all(0 <= int(ln[0]) < 3 for ln in lines)
    coords = [float(v) for ln in lines for v in ln[1:]]
    assert all(0.0 <= v <= 2.0 for v in coords)  # normalised (pose visibility flags are 2)
    if task == "segment":
        assert all(len(ln) >= 7 and len(ln) % 2 == 1 for ln in lines)  # class + at least 3 points
    elif task == "obb":
        assert all(len(ln) == 9 for ln in lines)
    else:
        assert all(len(ln) == 5 + KPT_SHAPE[0] * KPT_SHAPE[1] for ln in lines)
        assert "kpt_shape: [5, 3]" in a.read_text()


def test_new_keypoint_shape_trains_the_keypoint_branch() -> None:
    """A new kpt_shape re-initialises the keypoint branch: those layers are trained fully, the rest adapted."""
    from ultralytics.nn.tasks import PoseModel

    from lorakit.yolo.targets import detector_config, pose_heads
    from lorakit.yolo.trainer import new_head_modules

    base = _build("pose", nc=2)  # kpt_shape (5, 3): branch width max(64 / 4, 5 * 5) = 25
    model = PoseModel(YAMLS["pose"], nc=2, data_kpt_shape=(3, 2), verbose=False)  # width max(16, 12) = 16
    model.load(base, verbose=False)
    heads = pose_heads(model)
    new = new_head_modules(model, base, heads)
    assert "model.23.cv4.0.0.conv" in new and "model.23.cv4.2.1.bn" in new and "model.23.one2one_cv4_kpts.1" in new
    assert not any("cv3." in p for p in new)  # same classes: the class convs come from the base
    assert new_head_modules(base, base, pose_heads(base)) == []  # same shape: nothing trained fully
    report = lorakit.inject(model, detector_config(model, r=8, train_modules=new))
    assert not {t.name for t in report.targets} & set(new)
    assert all(p.requires_grad for h in new for p in model.get_submodule(h).parameters())


@pytest.mark.parametrize("task", TASKS)
def test_base_unchanged_and_only_adapter_trains(lab: Lab, task: str) -> None:
    r = lab.run(task)
    t, start = r.trainer, r.start
    assert tuple(t.lora_config.train_modules) == ()  # same classes and keypoints: the base supplies the head
    ref = lab.base_model(task).state_dict()
    lora = _lora_names(t.model)
    assert start["requires_grad"] == lora and {start["names"][i] for i in start["optimized"]} == lora
    for model in (t.model, t.ema.ema):
        sd = model.state_dict()
        base_keys = [k for k in sd if ".lora." not in k]
        assert set(base_keys) == set(ref)
        assert [k for k in base_keys if not torch.equal(sd[k].float(), ref[k].float())] == []
    sd = t.model.state_dict()
    changed = {k for k, v in start["state"].items() if not torch.equal(sd[k], v)}
    assert changed and changed <= lora
    assert any(n.endswith(".B") for n in changed)


@pytest.mark.parametrize("task", TASKS)
def test_disabled_adapter_is_the_base(lab: Lab, task: str) -> None:
    r = lab.run(task)
    x = _x(task, 1)
    with torch.no_grad():
        y_ref = layer_outputs(lab.base_model(task), x)
        for model in (r.trainer.model, r.trainer.ema.ema):
            model = deepcopy(model).float().eval()
            # trained channels-last (a CPU run); in the base's layout the convolutions round as the base's do
            with usual_layout(model), lorakit.disabled(model):
                assert torch.equal(layer_outputs(model, x), y_ref)
            assert not torch.equal(layer_outputs(model, x), y_ref)


@pytest.mark.parametrize("task", TASKS)
def test_merged_equals_unmerged(lab: Lab, task: str) -> None:
    trained = deepcopy(lab.run(task).trainer.ema.ema).float().eval()
    # one tiny epoch moves B only a little: also check large random factors, where a merge error would show
    strong = deepcopy(trained)
    gen = torch.Generator().manual_seed(0)
    for name, p in strong.named_parameters():
        if name.endswith(".lora.default.B"):
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    x = _x(task)
    for model in (trained, strong):
        with torch.no_grad():
            merged = lorakit.merge_and_unload(deepcopy(model))
            assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
            torch.testing.assert_close(layer_outputs(merged, x), layer_outputs(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_adapter_reproduces_the_ema(lab: Lab, task: str) -> None:
    from lorakit.io import load_adapter

    t = lab.run(task).trainer
    assert t.last_adapter.is_dir() and t.best_adapter.is_dir()
    fresh = lab.base_model(task)
    load_adapter(fresh, t.last_adapter)
    ema = deepcopy(t.ema.ema).float().eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer_outputs(fresh, _x(task)), layer_outputs(ema, _x(task)), atol=1e-5, rtol=1e-5)


def test_checkpoints_are_merged_and_plain(lab: Lab, plain_ultralytics: Callable[..., None]) -> None:
    paths = []
    for task in TASKS:
        t = lab.run(task).trainer
        for f in (t.last, t.best):
            ckpt = torch.load(f, map_location="cpu", weights_only=False)
            assert not any(isinstance(m, lorakit.LoraLayer) for m in ckpt["model"].modules())
            paths.append(f)
    plain_ultralytics(paths, imgsz=64)


def test_new_class_count_trains_the_head_fully(lab: Lab) -> None:
    from lorakit.yolo.targets import segment_heads

    r = lab.run("segment", "B")  # 3 classes on the 2-class base
    t, start = r.trainer, r.start
    new = [p for p in segment_heads(t.model) if "cv3." in p or ".semseg." in p]
    assert len(new) == 7 and set(t.lora_config.train_modules) == set(new)
    for p in new:
        m = t.model.get_submodule(p)
        assert type(m) is nn.Conv2d and m.out_channels == 3
    head_params = {f"{p}.{w}" for p in new for w in ("weight", "bias")}
    lora = _lora_names(t.model)
    assert start["requires_grad"] == lora | head_params
    sd = t.model.state_dict()
    changed = {k for k, v in start["state"].items() if not torch.equal(sd[k], v)}
    assert head_params <= changed <= lora | head_params
    ref = lab.base_model("segment").state_dict()  # everything else, mask-coefficient convs included, is the base
    for k, v in ref.items():
        if not _under(k, tuple(new)):
            assert torch.equal(sd[k], v), k
    # the adapter carries the new head: a 3-class model with the base's other weights + the adapter = the EMA
    from lorakit.io import load_adapter

    fresh = _build("segment", nc=3)
    fresh.load(lab.base_model("segment"), verbose=False)
    load_adapter(fresh, t.last_adapter)
    ema = deepcopy(t.ema.ema).float().eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            layer_outputs(fresh, _x("segment")), layer_outputs(ema, _x("segment")), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("task", TASKS)
def test_nan_loss_restores_the_last_saved_epoch(lab: Lab, task: str) -> None:
    """The mixin's NaN recovery also fits each task trainer (runs last: it replaces the trainer's EMA)."""
    t = lab.run(task).trainer
    good = t._last_good
    live = t.changing_state(t.model)
    assert good.taken and set(good.names) == set(live)
    saved = {k: v.clone() for k, v in live.items()}
    ema_before = {k: v.clone() for k, v in t.ema.ema.state_dict().items()}
    with torch.no_grad():
        for v in live.values():
            if v.is_floating_point():
                v.fill_(float("nan"))
    t.loss, t.fitness = torch.tensor(float("nan")), None
    assert t._handle_nan_recovery(epoch=t.start_epoch + 1) is True
    live = t.changing_state(t.model)
    assert all(torch.equal(live[k], v) for k, v in saved.items())
    ema = t.ema.ema.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in ema_before.items())
    t.loss = torch.tensor(1.0)
    assert t._handle_nan_recovery(epoch=t.start_epoch + 1) is False


@pytest.mark.parametrize("task", TASKS)
def test_loraYOLO_serves_each_task_from_base_plus_adapter(lab: Lab, task: str) -> None:
    from lorakit.yolo import LoraYOLO

    t = lab.run(task).trainer
    m = LoraYOLO(str(lab.base_pt(task)), adapter=t.last_adapter)
    assert m.task == task and m.active_adapter == f"{t.save_dir.name}-last"  # named after its run
    x = _x(task)
    ema = deepcopy(t.ema.ema).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(layer_outputs(m.model.eval(), x), layer_outputs(ema, x), atol=1e-5, rtol=1e-5)
        with m.adapter_disabled():
            assert torch.equal(layer_outputs(m.model.eval(), x), layer_outputs(lab.base_model(task), x))
    assert len(m.predict(x[:1], imgsz=IMGSZ[task], verbose=False)) == 1


def test_loraYOLO_gives_a_base_the_adapters_new_class_count(lab: Lab) -> None:
    from lorakit.yolo import LoraYOLO

    t = lab.run("segment", "B").trainer  # 3 classes, trained on the 2-class base
    m = LoraYOLO(str(lab.base_pt("segment")), adapter=t.last_adapter)
    assert m.names == t.ema.ema.names and len(m.names) == 3 and m.model.model[-1].nc == 3
    x = _x("segment")
    ema = deepcopy(t.ema.ema).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(layer_outputs(m.model.eval(), x), layer_outputs(ema, x), atol=1e-5, rtol=1e-5)
        with m.adapter_disabled():  # the base's own 2-class head is back
            assert len(m.names) == 2 and m.model.model[-1].nc == 2
            assert torch.equal(layer_outputs(m.model.eval(), x), layer_outputs(lab.base_model("segment"), x))
    res = m.predict(x[:1], imgsz=IMGSZ["segment"], conf=0.0, verbose=False)
    assert res[0].names == t.ema.ema.names
