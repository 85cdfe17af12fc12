"""Adapter files that are not regular files (item 8): a typed error naming the file, at once, and
exit 2 with one line from the CLI. The issue's item numbers are named in each test. (Item 1, killed
and concurrent saves: test_io_save_kill.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.io import load_adapter, save_adapter
from lorakit.io_errors import AdapterFileError

from .io_models import adapted_net, make_net, state_hash

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SRC = Path(lorakit.__file__).resolve().parents[1]
W = "adapter_model.safetensors"
C = "adapter_config.json"


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_adapter(adapted_net(), tmp_path / "a")


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    return save_adapter(adapted_net(), tmp_path / "good")


@pytest.fixture()
def deadline() -> Iterator[None]:
    """Fail a test that takes over 20 s (a read that hangs on a FIFO or never ends on /dev/zero)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError("the test ran past its 20 s deadline")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )


def one_error_line(err: str, verb: str) -> str:
    """The CLI's stderr for a bad input: exactly one line, ``lorakit VERB: error: ...``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorakit {verb}: error: "), err
    return lines[0]


# -- item 8: only regular files, bounded reads ------------------------------------------------


def make_special(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)


SPECIAL = [
    pytest.param("/dev/zero", marks=pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")),
    pytest.param("fifo", marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")),
]


@pytest.mark.parametrize("file", [W, C])
@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_are_refused_without_reading(
    saved: Path, good: Path, file: str, kind: str, deadline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 8: a weights or config file that is a FIFO (whose open waits for a writer) or a symlink
    to /dev/zero (st_size 0, endless reads) is refused at once by load_adapter and lorakit diff."""
    make_special(saved / file, kind)
    m = make_net()
    before = state_hash(m)
    with pytest.raises(AdapterFileError, match="adapter files must be regular files") as err:
        load_adapter(m, saved)
    assert str(saved / file) in str(err.value)
    assert ("FIFO" if kind == "fifo" else "character device") in str(err.value)
    assert state_hash(m) == before and lorakit.list_adapters(m) == []
    assert main(["diff", f"a={good}", f"b={saved}"]) == 2
    assert str(saved / file) in one_error_line(capsys.readouterr().err, "diff")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_special_pickle_file_is_refused(saved: Path, deadline: None) -> None:
    """Item 8: the opt-in pickle reader reads through the same bounded reader."""
    (saved / W).unlink()
    os.mkfifo(saved / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="FIFO"):
        load_adapter(make_net(), saved, allow_pickle=True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_diff_cli_on_a_fifo_exits_2(saved: Path, good: Path) -> None:
    """Item 8: the real command line, bounded by a 60 s timeout: a FIFO as weights is an error (2)."""
    make_special(saved / W, "fifo")
    done = run_cli("diff", f"a={good}", f"b={saved}")
    assert done.returncode == 2, done.stderr
    assert "FIFO" in one_error_line(done.stderr, "diff")


def test_file_over_the_cap_is_refused(saved: Path) -> None:
    """Item 8: the size cap still holds for regular files (config: 16 MiB)."""
    (saved / C).write_bytes(b" " * (16 * 1024 * 1024 + 1))
    with pytest.raises(AdapterFileError, match="larger than 16777216 bytes") as err:
        load_adapter(make_net(), saved)
    assert str(saved / C) in str(err.value)
