"""Without ultralytics or transformers: one line naming the pip extra, not a traceback.

Each case runs in a subprocess whose prelude makes importing the extra's package fail
(``sys.modules[name] = None``, as if it were not installed), then runs lorakit for real.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_CLI = "from lorakit.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


def _run(blocked: str, code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nsys.modules[{blocked!r}] = None  # importing it now raises ImportError\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *argv], capture_output=True, text=True, timeout=120
    )  # fmt: skip


@pytest.mark.parametrize(
    ("blocked", "extra", "argv"),
    [
        ("ultralytics", "yolo", ["yolo", "train", "model=yolo26n.yaml", "data=data.yaml"]),
        ("ultralytics", "yolo", ["merge", "base=base.pt", "adapter=a", "out=m.safetensors"]),
        ("transformers", "hf", ["hf", "train", "model=m", "data=d.jsonl", "out=o"]),
        ("transformers", "hf", ["hf", "generate", "model=m", "prompt=hi"]),
    ],
)
def test_cli_names_the_extra_in_one_line(blocked: str, extra: str, argv: list[str], tmp_path) -> None:
    done = _run(blocked, _CLI, *argv)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"needs {blocked}, which is not installed" in lines[0] and f'pip install "lorakit[{extra}]"' in lines[0]


def test_cli_folder_model_without_transformers(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    done = _run("transformers", _CLI, "inspect", f"model={tmp_path}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert 'pip install "lorakit[hf]"' in done.stderr


@pytest.mark.parametrize(
    ("blocked", "module", "extra"), [("ultralytics", "yolo", "yolo"), ("transformers", "hf", "hf")]
)
def test_import_raises_import_error_naming_the_extra(blocked: str, module: str, extra: str) -> None:
    code = (
        "try:\n"
        f"    import lorakit.{module}\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    done = _run(blocked, code)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    assert out.startswith("MissingExtraError lorakit.") and f'pip install "lorakit[{extra}]"' in out, out
