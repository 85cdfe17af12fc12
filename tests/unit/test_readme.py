"""Every ```python block in README.md runs as written, and every other block has a runner.

```py blocks (YOLO) and ```bash blocks of ``lorakit yolo`` run in tests/yolo/test_readme_yolo.py,
```bash blocks of ``lorakit inspect|merge|diff|hf`` in tests/hf/test_readme_cli.py, all with tiny
stand-ins for the reader's files (tests/readme_blocks.py); blocks that cannot run here are listed there with the reason.
"""

from __future__ import annotations

import pytest

from tests.readme_blocks import NOT_RUN, README, Block, blocks, runner, substitute

BLOCKS = [b.text for b in blocks() if b.lang == "python"]


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks write files (runs/...) relative to the working directory
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_every_block_has_a_runner() -> None:
    kinds = [runner(b) for b in blocks()]  # raises, naming the line, for a block no test runs
    assert {"python", "py", "bash-cli", "bash-yolo"} <= set(kinds), kinds
    # Every block listed as not runnable is still in the README (a stale entry would hide nothing, but mislead).
    assert set(NOT_RUN) <= {b.first_line for b in blocks()}


def test_unclaimed_block_and_unknown_name_fail_loudly() -> None:
    with pytest.raises(AssertionError, match="line 7: no test runs this bash block"):
        runner(Block(7, "bash", "lorakit export model=m.pt\n"))
    block = Block(9, "py", 'model = LoraYOLO("yolo26n.pt")\nmodel.predict("street.jpg")\n')
    with pytest.raises(AssertionError, match=r"line 9: the block uses \['street.jpg'\]"):
        substitute(block, {"yolo26n.pt": "/tmp/base.pt"})
    done = substitute(block, {"yolo26n.pt": "/t/b.pt", "street.jpg": None})
    assert done == block.text.replace("yolo26n.pt", "/t/b.pt")
    with pytest.raises(AssertionError, match="still trains big"):
        substitute(Block(3, "py", "m.train(epochs=20, imgsz=640)\n"), {})
