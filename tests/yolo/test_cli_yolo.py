"""``lorakit yolo train|val|predict|export|merge``, run in-process through ``lorakit.cli.main``.

One 1-epoch LoRA run (r=4, imgsz 64, one layer excluded by name) on a random-weight
2-class yolo26n base and a synthetic dataset is shared by the module; every other verb
then works on its ``best_adapter``. The conftest network guard fails any test that reaches for the network.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shutil
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors
import torch
from torch import nn
from yolo_helpers import assert_no_lorakit_class, checkpoint, final_outputs, save_random_detector, with_run_args

from lorakit.cli import main

pytestmark = pytest.mark.slow
IMGSZ = 64
QUIET = [f"imgsz={IMGSZ}", "batch=8", "workers=0", "plots=False", "device=cpu", "verbose=False"]
# One pattern, given as a plain string (no comma): the run must leave exactly this conv without LoRA.
EXCLUDED = "model.23.cv2.0.0.conv"
NEIGHBOUR = "model.23.cv2.0.1.conv"  # the next conv of the same box branch, adapted by default


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from lorakit.yolo import make_dataset

    root = tmp_path_factory.mktemp("cli_yolo")
    for name, seed in (("base.pt", 0), ("other_base.pt", 1)):
        save_random_detector(root / name, seed)
    data = make_dataset(root / "data", domain="A", n_train=16, n_val=8, imgsz=IMGSZ, seed=0)
    argv = ["yolo", "train", f"model={root / 'base.pt'}", f"data={data}", "epochs=1", "r=4", f"exclude={EXCLUDED}"]
    argv += QUIET
    argv += ["nbs=8", "warmup_epochs=0", "seed=0", f"project={root / 'runs'}", "name=cli"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    weights = root / "runs" / "cli" / "weights"
    return SimpleNamespace(
        root=root,
        pt=root / "base.pt",
        other_pt=root / "other_base.pt",
        data=Path(data),
        code=code,
        out=out.getvalue(),
        weights=weights,
        adapter=weights / "best_adapter",
    )


def test_train_writes_merged_checkpoints_and_adapters_and_says_where(run: SimpleNamespace) -> None:
    assert run.code == 0
    for name in ("best.pt", "last.pt"):
        assert (run.weights / name).is_file()
        assert str(run.weights / name) in run.out
    for name in ("best_adapter", "last_adapter"):
        assert (run.weights / name / "adapter_model.safetensors").is_file()
        assert str(run.weights / name) in run.out


def test_exclude_with_one_pattern_leaves_that_layer_unadapted(run: SimpleNamespace) -> None:
    """Issue item 3: ``exclude=model.23.cv2.0.0.conv`` (one pattern, a string) was split into its
    characters, so the named conv was adapted anyway. The adapter must hold no LoRA for it."""
    from lorakit.layers import LoraLayer
    from lorakit.yolo import LoraYOLO

    assert run.code == 0
    with safetensors.safe_open(str(run.adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if f"{EXCLUDED}.lora" in k]
    assert [k for k in keys if f"{NEIGHBOUR}.lora" in k]  # the pattern named one layer, not the branch
    model = LoraYOLO(str(run.pt), adapter=run.adapter).model
    assert type(model.get_submodule(EXCLUDED)) is nn.Conv2d
    assert isinstance(model.get_submodule(NEIGHBOUR), LoraLayer)


def _map(text: str) -> tuple[str, str]:
    m = re.search(r"mAP50-95 (\S+)  mAP50 (\S+)", text)
    assert m, text
    return m.group(1), m.group(2)


def _pseudo_labelled(run: SimpleNamespace, root: Path) -> Path:
    """The val images labelled with base + adapter's own top box, so mAP is far from 0
    (a 1-epoch model from random weights scores 0 on the real labels, which would prove nothing)."""
    from lorakit.yolo import LoraYOLO

    images = run.data.parent / "images" / "val"
    (root / "images").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    shutil.copytree(images, root / "images" / "val")
    model = LoraYOLO(str(run.pt), adapter=run.adapter)
    for r in model.predict(str(images), imgsz=IMGSZ, conf=0.001, max_det=1, device="cpu", verbose=False):
        rows = [
            f"{int(c)} {' '.join(f'{v:.6f}' for v in box)}" for c, box in zip(r.boxes.cls, r.boxes.xywhn, strict=True)
        ]
        (root / "labels" / "val" / f"{Path(r.path).stem}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames: {{0: rectangle, 1: circle}}\n")
    return data


def test_val_prints_the_same_map_as_the_python_api(run: SimpleNamespace, capsys: Any, tmp_path: Path) -> None:
    from lorakit.yolo import LoraYOLO

    data = _pseudo_labelled(run, tmp_path / "pseudo")
    args = [f"model={run.pt}", f"data={data}", *QUIET, f"project={tmp_path}"]
    assert main(["yolo", "val", *args, f"adapter={run.adapter}", "name=cli"]) == 0
    out = capsys.readouterr().out
    assert "'cli-best'" in out  # the adapter is named after its run (runs/cli/weights/best_adapter)
    got = _map(out)
    metrics = LoraYOLO(str(run.pt), adapter=run.adapter).val(
        data=str(data), imgsz=IMGSZ, batch=8, workers=0, plots=False, device="cpu", verbose=False,
        project=str(tmp_path), name="api",
    )  # fmt: skip
    assert got == (f"{metrics.box.map:.4f}", f"{metrics.box.map50:.4f}")
    assert float(got[0]) > 0.0, got  # its own predictions as labels

    assert main(["yolo", "val", *args, "name=base"]) == 0
    out = capsys.readouterr().out
    assert "the base model" in out and _map(out) != got


def test_predict_saves_results_and_counts_detections(run: SimpleNamespace, capsys: Any, tmp_path: Path) -> None:
    source = run.data.parent / "images" / "val"
    assert source.is_dir()
    argv = [f"model={run.pt}", f"adapter={run.adapter}", f"source={source}", "conf=0.0", *QUIET]
    assert main(["yolo", "predict", *argv, f"project={tmp_path}", "name=pred"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.search(r": \d+ detections?$", line)]
    assert len(lines) == 8 and all(line.startswith(str(source)) for line in lines)
    assert f"results saved to {tmp_path / 'pred'}" in out
    assert len(list((tmp_path / "pred").glob("*.jpg"))) == 8


def _export_ready(model: nn.Module) -> nn.Module:
    """The model as Ultralytics' Exporter traces it for ONNX: fused, head in export mode (end-to-end top-k)."""
    from ultralytics.nn.modules.head import Detect

    model = deepcopy(model).float().eval().fuse()
    for m in model.modules():
        if isinstance(m, Detect):
            m.dynamic, m.export, m.format, m.xyxy, m.shape = False, True, "onnx", False, None
            m.agnostic_nms = False
            m.max_det = min(300, sum((IMGSZ // int(s)) ** 2 for s in model.stride.tolist()))
    return model


def test_export_onnx_runs_and_matches_the_merged_model(run: SimpleNamespace, capsys: Any) -> None:
    import onnxruntime as ort

    from lorakit.yolo import LoraYOLO

    argv = [f"model={run.pt}", f"adapter={run.adapter}", "format=onnx", f"imgsz={IMGSZ}", "device=cpu"]
    assert main(["yolo", "export", *argv]) == 0
    out = capsys.readouterr().out
    onnx_file = run.weights / "best_adapter.onnx"  # named after the adapter, not base.onnx next to the base
    assert onnx_file.is_file() and str(onnx_file) in out
    assert not (run.root / "base.onnx").exists()

    x = _x()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    merged = LoraYOLO(str(run.pt), adapter=run.adapter).merged_model()
    with torch.no_grad():
        ref = _export_ready(merged)(x)
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-4, rtol=1e-4)


def test_merge_writes_a_plain_checkpoint_atomically(run: SimpleNamespace, capsys: Any, tmp_path: Path) -> None:
    from ultralytics import YOLO

    from lorakit.yolo import LoraYOLO

    out_file = tmp_path / "merged.pt"
    argv = ["yolo", "merge", f"model={run.pt}", f"adapter={run.adapter}", f"out={out_file}"]
    assert main(argv) == 0
    assert str(out_file) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pt"]  # no temp file left behind
    assert_no_lorakit_class(out_file)
    plain = YOLO(str(out_file)).model.float().eval()
    ref = LoraYOLO(str(run.pt), adapter=run.adapter).merged_model().eval()
    x = _x(1)
    # the file is fp16, as Ultralytics saves every checkpoint
    torch.testing.assert_close(final_outputs(plain, x), final_outputs(ref, x), atol=2e-2, rtol=2e-2)

    before = out_file.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "merged.pt" in err and "overwrite=True" in err
    assert out_file.read_bytes() == before
    assert main([*argv, "overwrite=True"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pt"]


def test_merge_output_carries_the_adapter_runs_data_and_says_it_is_a_merge(
    run: SimpleNamespace, capsys: Any, tmp_path: Path
) -> None:
    """Issue 13 item 3: ``lorakit yolo merge`` wrote the base's ``train_args`` (its run's data set)
    into the merged file, so ``yolo val model=merged.pt`` validated on the base's data with the
    adapter's class names. The file must carry the adapter run's data and image size, its class
    names, and a description naming the adapter and the base."""
    from ultralytics import YOLO

    from lorakit.yolo.data import DOMAINS

    other = tmp_path / "other" / "data.yaml"  # the base's own run was on another data set
    base = with_run_args(run.pt, tmp_path / "base_other.pt", data=str(other), imgsz=320, task="detect")
    out_file = tmp_path / "merged.pt"
    assert main(["yolo", "merge", f"model={base}", f"adapter={run.adapter}", f"out={out_file}"]) == 0
    capsys.readouterr()
    ckpt = checkpoint(out_file)
    assert (ckpt["train_args"]["data"], ckpt["train_args"]["imgsz"]) == (str(run.data), IMGSZ)
    assert ckpt["description"] == (
        f"LoRA merge: adapter {run.adapter} merged into base {base}; adapter trained on {run.data}"
    )
    plain = YOLO(str(out_file))
    assert plain.names == dict(enumerate(DOMAINS["A"]))
    assert plain.overrides["data"] == str(run.data)  # what `yolo val model=merged.pt` validates on


def _bad_cases(run: SimpleNamespace, tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(argv, strings the one-line error must contain)."""
    not_adapter = tmp / "not_an_adapter"
    not_adapter.mkdir()
    no_images = tmp / "no_images.yaml"
    no_images.write_text(f"path: {tmp / 'nowhere'}\ntrain: images/train\nval: images/val\nnames: {{0: a, 1: b}}\n")
    base, data, adapter = f"model={run.pt}", f"data={run.data}", f"adapter={run.adapter}"
    return [
        (["val", f"model={tmp / 'nope.pt'}", data], ["model=", "nope.pt", "no such file"]),
        (["val", "model=yolo26n.pt", data], ["yolo26n.pt", "never downloads"]),
        (["val", base, f"data={tmp / 'nope.yaml'}"], ["data=", "nope.yaml", "no such file"]),
        (["val", base, f"data={no_images}"], ["no_images.yaml", "images not found"]),
        (["val", base, data, f"adapter={tmp / 'nope_adapter'}"], ["nope_adapter", "no such adapter folder"]),
        (["val", base, data, f"adapter={not_adapter}"], ["not_an_adapter", "adapter_model.safetensors"]),
        (["val", f"model={run.other_pt}", data, adapter], ["best_adapter", "different base model"]),
        (["merge", f"model={run.other_pt}", adapter, f"out={tmp / 'm.pt'}"], ["best_adapter", "different base"]),
        (["train", base, data, "epoch=5"], ["'epoch'", "'epochs'"]),
        (["train", base, data, "epochs=abc"], ["epochs=abc", "int"]),
        (["train", base, data, "r=big"], ["r=", "int", "'big'"]),
        (["train", base, data, "resume=True"], ["resume"]),
        (["train", base], ["data=..."]),
        (["predict", base, adapter], ["source=..."]),
        (["predict", base, "source=https://example.com/a.jpg"], ["source=", "URLs"]),
        (["predict", base, f"source={tmp / 'nope.jpg'}"], ["nope.jpg", "no such file"]),
        (["val", base, data, "r=4"], ["'r'", "yolo train"]),
        (["merge", base, adapter], ["out=..."]),
        (["merge", base, adapter, f"out={tmp / 'm.onnx'}"], ["m.onnx", ".pt"]),
        (["merge", base, adapter, f"out={run.pt}", "overwrite=True"], ["base model itself"]),
        (["trian", base], ["'trian'", "'train'"]),
    ]


def test_bad_input_exits_2_with_a_one_line_error_naming_it(
    run: SimpleNamespace, capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # model=yolo26n.pt: relative, and not there
    failures = []
    for argv, needles in _bad_cases(run, tmp_path):
        capsys.readouterr()
        code = main(["yolo", *argv])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit yolo: error:")]
        if code != 2 or len(err) != 1 or not all(n in err[0] for n in needles):
            failures.append((argv, code, err, needles))
    assert not failures, "\n".join(map(str, failures))
    assert not (tmp_path / "m.pt").exists()


def _bad_device() -> tuple[str, list[str]]:
    """A CUDA device that is not there: cuda:0 without CUDA, else one past the last index."""
    if not torch.cuda.is_available():
        return "device=cuda:0", ["device='cuda:0'", "CUDA", "not available", "device=cpu"]
    n = torch.cuda.device_count()
    return f"device=cuda:{n}", [f"device='cuda:{n}'", f"{n} CUDA device(s)"]


BAD_SETTINGS = {  # id -> (verb, key=value, strings the one-line error must contain)
    "optimizer": ("train", "optimizer=Foo", ["optimizer", "'Foo'", "AdamW", "SGD"]),
    "optimizer-musgd": ("train", "optimizer=MuSGD", ["optimizer='MuSGD'", "not supported with LoRA", "AdamW"]),
    "format": ("export", "format=bogus", ["format", "'bogus'", "onnx", "torchscript"]),
    "format-package": ("export", "format=openvino", ["format='openvino'", "'openvino'", "not installed"]),
    "device": ("train", *_bad_device()),
}


@pytest.mark.parametrize("case", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_setting_exits_2_before_any_work(
    run: SimpleNamespace, case: tuple[str, str, list[str]], capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue item 10: ``optimizer=Foo``, ``format=bogus``, ``format=openvino`` without the package and
    ``device=cuda:0`` without CUDA were tracebacks from deep inside Ultralytics (after the dataset was
    cached or the model prepared for export). Each must be one line naming the key, the accepted values
    and the value, exit 2, and come before anything is trained or exported."""
    verb, setting, needles = case
    if setting == "format=openvino" and importlib.util.find_spec("openvino") is not None:
        pytest.skip("openvino is installed here")
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    argv = {
        "train": ["train", f"model={run.pt}", f"data={run.data}", "epochs=1", *QUIET, f"project={runs}"],
        "export": ["export", f"model={run.pt}", f"imgsz={IMGSZ}"],
    }[verb]
    before = sorted(run.root.iterdir())
    capsys.readouterr()
    code = main(["yolo", *argv, setting])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorakit yolo: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert all(n in lines[0] for n in needles), (lines[0], needles)
    assert not runs.exists() and sorted(run.root.iterdir()) == before  # nothing trained, nothing exported
    assert list(tmp_path.iterdir()) == []


def test_usage(capsys: Any) -> None:
    assert main(["yolo"]) == 2
    assert main(["yolo", "help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "val", "predict", "export", "merge"):
        assert f"lorakit yolo {verb}" in out
    assert main(["--help"]) == 0
    assert "lorakit yolo train" in capsys.readouterr().out
