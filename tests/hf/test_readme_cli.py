"""README.md's ```bash blocks of ``lorakit inspect|merge|diff|hf`` commands, run as a reader types them
(line by line through the command's entry point, from one working folder), with tiny stand-ins for the
reader's model and data.

In this process, as tests/yolo/test_readme_yolo.py runs the ``lorakit yolo`` block: a subprocess per
line imported torch and transformers six times (~50 of this test's ~80 CPU seconds). ``python -m
lorakit.cli`` itself is run in a subprocess by tests/unit/test_cli_merge_diff.py (merge, diff) and
tests/hf/test_interrupt.py (hf train)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
import lorakit.hf
from lorakit.cli import main
from tests.readme_blocks import blocks, runner, substitute

from .runs import causal_data

# Exit codes the README documents for a command other than 0.
EXPECTED_RC = {"diff": 1}  # the two stand-in adapters differ: "exit 0 identical, 1 different"


def _adapter(folder: Path, seed: int, out: Path) -> Path:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.hf.lora_config(model, r=4, init="random"))
    return lorakit.save_adapter(model, out)


def test_readme_cli_blocks_run(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"  # the reader's working folder: runs/... and outputs land here
    work.mkdir()
    gpt2 = tiny_models["gpt2"]
    stand_ins: dict[str, str | None] = {
        "path/to/model": str(gpt2),
        'prompt="Hello"': 'prompt="Hello" max_new_tokens=8',  # the stand-in model's context is 64 positions
        "train.jsonl": str(causal_data(tmp_path / "train.jsonl")),
        "runs/a": str(_adapter(gpt2, 1, tmp_path / "a")),
        "runs/b": str(_adapter(gpt2, 2, tmp_path / "b")),
        "runs/chat": None,  # written by the first command, read by the next ones
        "runs/chat/adapter": None,
        "merged.safetensors": None,
    }
    ran = []
    monkeypatch.chdir(work)  # after the stand-ins (absolute paths): the commands' relative paths land in work
    for block in blocks():
        if runner(block) != "bash-cli":
            continue
        # epochs=3 as written: 18 records of a 2-layer model are 9 steps (seconds); resume must see the same r.
        for line in substitute(block, stand_ins, tiny=False).splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            assert argv[0] == "lorakit", line
            code = main(argv[1:])
            want = EXPECTED_RC.get(argv[1], 0)
            out = capsys.readouterr()
            assert code == want, f"README.md line {block.line}: {line}\n{out.out[-2000:]}{out.err[-2000:]}"
            ran.append(argv[1])
    assert {"inspect", "merge", "diff", "hf"} <= set(ran), ran
    assert (work / "merged.safetensors").is_file() and (work / "runs" / "chat" / "adapter").is_dir()
