"""`lorakit merge` and `lorakit diff`, through lorakit.cli.main and once each through `python -m lorakit.cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import lorakit
from lorakit.cli import main, models

from .io_models import IDS, adapted_net, make_net

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
BASE = "base=tests.unit.io_models:make_net"
W = "adapter_model.safetensors"


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    return lorakit.save_adapter(adapted_net(0), tmp_path / "a")


def merged_model(file: Path) -> nn.Module:
    m = make_net(0)
    m.load_state_dict(safetensors.torch.load_file(str(file)))  # strict: exactly the base's keys
    return m


def rewrite(src: Path, dst: Path, change: dict[str, torch.Tensor]) -> Path:
    """Copy adapter ``src`` to ``dst`` with some tensors replaced (as another tool would write it)."""
    dst.mkdir()
    tensors = safetensors.torch.load((src / W).read_bytes())
    tensors.update(change)
    (dst / W).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    return dst


# -- merge ------------------------------------------------------------------------------------


def test_merge_writes_the_merged_state_dict(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged.safetensors"
    assert main(["merge", BASE, f"adapter={adapter}", f"out={out}"]) == 0
    assert "4 layers" in capsys.readouterr().out
    want = adapted_net(0)(IDS)
    m = merged_model(out)
    assert not any(isinstance(x, lorakit.LoraLayer) for x in m.modules())
    torch.testing.assert_close(m(IDS), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(make_net(0)(IDS), want)  # the adapter really changes the outputs
    assert not list(tmp_path.glob(".merged*"))  # no temp file left behind


def test_merge_is_strict_about_the_base(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    other = ["merge", "base=tests.unit.io_models:make_net", "args=[1]", f"adapter={adapter}", f"out={out}"]
    assert main(other) == 2
    assert "different base model" in capsys.readouterr().err and not out.exists()
    with pytest.warns(UserWarning, match="different base model"):
        assert main([*other, "allow_other_base=True"]) == 0
    assert out.exists()


@pytest.mark.parametrize(
    "out,why",
    [
        ("m.pt", "must end with .safetensors"),
        ("missing/m.safetensors", "does not exist"),
        ("a/adapter_model.safetensors", "overwrite the adapter itself"),
    ],
)
def test_merge_refuses_bad_outputs(
    adapter: Path, tmp_path: Path, out: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (adapter / W).read_bytes()
    args = ["merge", BASE, f"adapter={adapter}", f"out={tmp_path / out}", "overwrite=True"]
    assert main(args) == 2
    assert why in capsys.readouterr().err
    assert (adapter / W).read_bytes() == before


def test_merge_does_not_overwrite_unless_asked(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep")
    assert main(["merge", BASE, f"adapter={adapter}", f"out={out}"]) == 2
    assert out.read_bytes() == b"keep"
    assert main(["merge", BASE, f"adapter={adapter}", f"out={out}", "overwrite=True"]) == 0
    merged_model(out)


def test_merge_root_keeps_names_inside_it(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    for adapter_name, out_name in [
        ("../a", "m.safetensors"),
        (str(adapter), "m.safetensors"),  # absolute
        ("a", "../m.safetensors"),
        ("a", "link/m.safetensors"),  # a symlink out of root
    ]:
        assert main(["merge", BASE, f"root={root}", f"adapter={adapter_name}", f"out={out_name}"]) == 2
        err = capsys.readouterr().err
        assert "inside" in err or "outside" in err, err
    assert not list(outside.iterdir()) and not (tmp_path.parent / "m.safetensors").exists()
    assert main(["merge", BASE, f"root={root}", "adapter=a", "out=m.safetensors"]) == 0
    merged_model(root / "m.safetensors")


def test_merge_base_loader_hook(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[str, object]] = []

    def load_fake(spec: str, args: object) -> nn.Module:
        seen.append((spec, args))
        return make_net(0)

    monkeypatch.setattr(models, "_LOADERS", {})
    out = tmp_path / "m.safetensors"
    assert main(["merge", "base=weights.fake", f"adapter={adapter}", f"out={out}"]) == 2
    assert "no loader for '.fake'" in capsys.readouterr().err
    models.register_base_loader(".FAKE", load_fake)
    assert main(["merge", "base=weights.fake", "args={'x': 1}", f"adapter={adapter}", f"out={out}"]) == 0
    assert seen == [("weights.fake", {"x": 1})]
    torch.testing.assert_close(merged_model(out)(IDS), adapted_net(0)(IDS), rtol=1e-5, atol=1e-5)


def test_usage_lists_the_new_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help"]) == 0
    text = capsys.readouterr().out
    assert "lorakit merge base=" in text and "lorakit diff a=" in text


# -- diff -------------------------------------------------------------------------------------


def test_diff_identical_files(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    again = lorakit.save_adapter(adapted_net(0), tmp_path / "again")
    assert main(["diff", f"a={adapter}", f"b={again}"]) == 0
    assert "identical" in capsys.readouterr().out


def test_diff_reports_values_with_max_and_relative_norm(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "base_model.model.lin.lora_B.weight"
    old = safetensors.torch.load((adapter / W).read_bytes())[key]
    new = old.clone()
    new[0, 0] += 0.5
    b = rewrite(adapter, tmp_path / "b", {key: new})
    assert main(["diff", f"a={adapter}", f"b={b}"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("1 difference(s)")
    rel = 0.5 / float(old.double().norm())
    assert out[0] == f"values   {key}: max|a-b| {0.5:.3e}  ||a-b||/||a|| {rel:.3e}"
    # within atol: identical
    tiny = old.clone()
    tiny[0, 0] += 1e-6
    c = rewrite(adapter, tmp_path / "c", {key: tiny})
    assert main(["diff", f"a={adapter}", f"b={c}"]) == 1
    assert main(["diff", f"a={adapter}", f"b={c}", "atol=1e-5"]) == 0


def test_diff_reports_config_shapes_and_missing_tensors(
    adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_net(0)
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=6, targets=["conv", "gconv", "lin"], init="random"))
    b = lorakit.save_adapter(m, tmp_path / "b")
    assert main(["diff", f"a={adapter}", f"b={b}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "config   r: 4 -> 2" in lines
    assert any(line.startswith("config   target_modules:") for line in lines)
    assert "only a   base_model.model.emb.lora_embedding_A [4, 20]" in lines
    assert "shape    base_model.model.lin.lora_A.weight: [4, 8] -> [2, 8]" in lines
    assert not any(line.startswith("only b") or "lora_alpha" in line for line in lines)


def test_diff_errors_exit_2(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", f"a={adapter}", f"b={tmp_path / 'nope'}"]) == 2
    assert "no such adapter folder" in capsys.readouterr().err
    corrupt = rewrite(adapter, tmp_path / "corrupt", {})
    (corrupt / W).write_bytes((corrupt / W).read_bytes()[:-3])
    assert main(["diff", f"a={adapter}", f"b={corrupt}"]) == 2
    assert main(["diff", f"a={adapter}"]) == 2
    assert main(["diff", f"a={adapter}", f"b={adapter}", "atol=-1"]) == 2
    assert main(["diff", f"a={adapter}", f"b={adapter}", "color=1"]) == 2


# -- the real command line ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def test_merge_and_diff_through_python_m(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    done = run_cli("merge", BASE, f"adapter={adapter}", f"out={out}")
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(merged_model(out)(IDS), adapted_net(0)(IDS), rtol=1e-5, atol=1e-5)
    b = lorakit.save_adapter(adapted_net(1), tmp_path / "b")
    done = run_cli("diff", f"a={adapter}", f"b={b}")
    assert done.returncode == 1, done.stderr
    assert "difference(s)" in done.stdout
