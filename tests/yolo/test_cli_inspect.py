"""``lorakit inspect`` and ``lorakit merge`` take YOLO files through the lazy base loaders."""

from __future__ import annotations

import lorakit
from lorakit.cli import main
from lorakit.yolo import detector_config


def test_inspect_yolo_yaml_lists_convs_and_budget(capsys) -> None:
    assert main(["inspect", "model=yolo26n.yaml", "r=8", "target_types=Conv2d", "exclude=model.0.conv"]) == 0
    out = capsys.readouterr().out
    assert "model.23.one2one_cv3.2.2" in out and "Conv2d" in out
    assert "125 adaptable layers" not in out  # the stem is still listed, only not selected
    assert "126 adaptable layers" in out


def test_yolo_loader_builds_the_same_model_as_ultralytics() -> None:
    from ultralytics import YOLO

    from lorakit.cli.models import load_base

    model = load_base("yolo26n.yaml")
    ref = YOLO("yolo26n.yaml").model
    assert type(model) is type(ref)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    report = lorakit.inject(model, detector_config(model, r=8))
    assert report.trainable > 0


def test_missing_pt_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["inspect", f"model={tmp_path / 'nope.pt'}"]) == 2
    assert "nope.pt" in capsys.readouterr().err
