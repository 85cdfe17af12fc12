"""The lorakit command and the core demo, run for real."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.cli.args import parse_value


def test_parse_value_is_literal_only(tmp_path) -> None:
    assert parse_value("8") == 8
    assert parse_value("0.5") == 0.5
    assert parse_value("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_value("['a', 'b']") == ["a", "b"]
    marker = tmp_path / "ran"
    # A string that would run code under eval() stays a plain string.
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert parse_value(code) == code
    assert not marker.exists()


def test_inspect_lists_layers_and_budget(capsys) -> None:
    assert main(["inspect", "model=torchvision.models:resnet18", "r=8", "target_types=Conv2d", "exclude=conv1"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "Conv2d" in out
    # the budget printed equals the report of a real injection with the same config
    import torchvision

    report = lorakit.inject(
        torchvision.models.resnet18(), lorakit.LoraConfig(r=8, target_types=["Conv2d"], exclude=["conv1"])
    )
    assert f"{report.lora_params:,} trainable" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "model=nope"], "expected 'package.module:factory'"),
        (["inspect", "model=no_such_pkg:f"], "cannot import"),
        (["inspect", "model=torch.nn:Linear", "args=[2,3]", "rank=4"], "unknown key 'rank'"),
        (["inspect", "r8"], "expected key=value"),
        (["inspect", "model=torch.nn:Linear", "args=[2,3]", "r=0", "targets=x"], "r must be an int > 0"),
    ],
)
def test_inspect_bad_input_exits_2_with_message(argv, needle, capsys) -> None:
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unknown_verb_and_help(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown verb" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip().endswith(lorakit.__version__)


def test_merged_model_loads_without_lorakit(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_types=["Conv2d", "Linear"], init="random"))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x).detach()
    lorakit.merge_and_unload(model)
    torch.save({"model": model, "x": x, "y": expected}, tmp_path / "m.pt")
    script = (
        "import sys; sys.modules['lorakit'] = None\n"  # any import of lorakit now fails
        "import torch\n"
        f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        "assert (d['model'](d['x']) - d['y']).abs().max() < 1e-5\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_core_demo_runs_and_passes_its_checks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lorakit.demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "all checks passed" in done.stdout
    assert "logits equal base: True" in done.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspct", "model=torch.nn:Linear"], "unknown verb 'inspct'; did you mean 'inspect'?"),
        (["inspect", "model=torch.nn:Linear", "args=[2,3]", "targtes=x"], "did you mean 'targets'"),
        (["merge", "bsae=x", "adapter=a", "out=o.safetensors"], "did you mean 'base'?"),
        (["diff", "a=x", "bb=y"], "did you mean 'b'?"),
    ],
)
def test_typos_name_the_close_key(argv, needle, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_merge_errors_name_base_not_model(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for spec, needle in (("nope", "base='nope': expected"), ("no_such_pkg:f", "base='no_such_pkg:f': cannot import")):
        assert main(["merge", f"base={spec}", "adapter=a", "out=o.safetensors"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "model=" not in err, err


def test_core_demo_help_prints_usage_and_runs_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "lorakit.demo", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The usage, and nothing the demo's run prints (its table, its verdict).
    assert "trainable / total" not in done.stdout and "all checks passed" not in done.stdout
    assert done.stdout.startswith("usage: python -m lorakit.demo")
    bad = subprocess.run([sys.executable, "-m", "lorakit.demo", "--quick"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --quick" in bad.stderr
