"""Issue item 1: a save killed at any point, or two saves into one folder at once, never lose the adapter.

Real files and real processes: savers are forked from tests/unit/io_saver.py (one torch import
for the whole module) and killed with SIGKILL, at every file operation of a save, right between
the weights and the config rename, and at random times. After each kill the folder must load with
lorakit.load_adapter to the adapter saved before or the one being saved, tensor for tensor.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.io_folder import folder_lock

from .io_saver import base, numbered

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SRC = Path(lorakit.__file__).resolve().parents[1]  # the lorakit under test, for the child process too
W = "adapter_model.safetensors"
C = "adapter_config.json"
# What a folder may hold after a kill: the adapter, and the fixed-name leftovers the next save
# removes (lorakit.io_folder). Anything else (a temporary name per save) would pile up.
ALLOWED = {W, C, ".adapter_model.safetensors.tmp", ".adapter_config.json.new", ".lorakit.lock"}

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the savers are forked")


class Savers:
    """The io_saver process: forks savers on request."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(ROOT)])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.io_saver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.alive: set[int] = set()

    def _ask(self, line: str, timeout: float = 120) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"io_saver did not answer {line!r} within {timeout} s"
        return self.proc.stdout.readline().strip()

    def start(
        self, folder: Path, first: int, count: int = 1, stride: int = 1, kill_after: int = 0, go: Path | None = None
    ) -> int:
        """Fork a saver of numbered(first), numbered(first + stride), ... into ``folder``; its pid."""
        steps = folder.parent / f"steps-{first}"
        reply = self._ask(f"save {folder} {first} {count} {stride} {kill_after} {steps} {go or '-'}")
        pid = int(reply.split()[1])
        self.alive.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        code = int(self._ask(f"wait {pid}", timeout=60).split()[1])
        self.alive.discard(pid)
        return code

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def killed_at(self, folder: Path, n: int, step: int) -> None:
        """Save numbered(n) into ``folder``, killed right after the save's ``step``-th file operation."""
        assert self.wait(self.start(folder, n, kill_after=step)) == -signal.SIGKILL, f"step {step}"

    def steps(self, folder: Path, n: int) -> int:
        """How many file operations a save of numbered(n) into ``folder`` makes (on a copy of it)."""
        dry = folder.parent / f"dry-{folder.name}"
        shutil.copytree(folder, dry)
        assert self.wait(self.start(dry, n)) == 0
        shutil.rmtree(dry)
        return int((folder.parent / f"steps-{n}").read_text())

    def close(self) -> None:
        for pid in self.alive:
            os.kill(pid, signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def savers() -> Iterator[Savers]:
    s = Savers()
    try:
        yield s
    finally:
        s.close()


def loaded_number(folder: Path) -> int:
    """Load ``folder`` strictly; the number n of the adapter it holds, checked tensor for tensor
    against numbered(n) (never a mix of two saves)."""
    m = base()
    lorakit.load_adapter(m, folder)
    n = int(m[0].lora["default"].B[0, 0])
    want = numbered(n)
    for got, ref in zip(m, want, strict=True):
        g, r = got.lora["default"], ref.lora["default"]
        assert g.r == r.r and torch.equal(g.A, r.A) and torch.equal(g.B, r.B), f"{folder} holds a mix"
    return n


def leftovers(folder: Path) -> set[str]:
    names = {p.name for p in folder.iterdir()}
    assert names <= ALLOWED, f"temporary files pile up in {folder}: {sorted(names - ALLOWED)}"
    return names


def save(model: nn.Module, folder: Path) -> None:
    lorakit.save_adapter(model, folder)


def loaded_copy(folder: Path, tmp: Path) -> int:
    """loaded_number of a copy of ``folder`` (a load may finish a killed save's rename: the
    original stays as the kill left it)."""
    copy = tmp / f"copy-{folder.name}"
    shutil.copytree(folder, copy)
    try:
        return loaded_number(copy)
    finally:
        shutil.rmtree(copy)


def inode(path: Path) -> int | None:
    return path.stat().st_ino if path.exists() else None


def kill_after_weights_rename(savers: Savers, folder: Path, n: int) -> None:
    """Kill the save of numbered(n) into ``folder`` right after adapter_model.safetensors was
    renamed into place, before the config is: found by killing copies at each step in turn."""
    for step in range(1, savers.steps(folder, n) + 1):
        probe = folder.parent / f"probe-{folder.name}"
        shutil.copytree(folder, probe)
        before = inode(probe / W)
        savers.killed_at(probe, n, step)
        renamed = inode(probe / W) != before
        shutil.rmtree(probe)
        if renamed:
            savers.killed_at(folder, n, step)
            return
    raise AssertionError("no step of the save renamed the weights file")


@pytest.mark.parametrize("start", ["over another adapter", "into an empty folder"])
def test_kill_between_the_weights_and_the_config_rename(savers: Savers, tmp_path: Path, start: str) -> None:
    """Item 1: killed after the new weights are in place and before the new config is, the folder
    loads as the new adapter: readers roll forward to the config the save wrote beside the old
    one (or beside none), in memory while a saver holds the folder's lock, else finishing the
    rename on disk."""
    folder = tmp_path / "a"
    if start == "over another adapter":
        save(numbered(2), folder)  # 3 has another rank: the config changes
    else:
        folder.mkdir()
    kill_after_weights_rename(savers, folder, 3)
    assert loaded_copy(folder, tmp_path) == 3
    assert leftovers(folder) >= {W, ".adapter_config.json.new"}
    with folder_lock(folder):
        assert loaded_number(folder) == 3
    assert ".adapter_config.json.new" in leftovers(folder)
    assert loaded_number(folder) == 3
    assert leftovers(folder) == {W, C}  # adapter_config.json matches again: PEFT reads the new adapter


@pytest.mark.parametrize("start", ["clean", "after a kill between the renames"])
def test_kill_at_every_step_of_a_save(savers: Savers, tmp_path: Path, start: str) -> None:
    """Item 1: a save of adapter 3 over adapter 2 (another config) killed right after each of its
    file operations in turn: the folder always loads as adapter 2 or 3, only the fixed-name
    leftovers remain, and the next save cleans them up. Starting from what a kill between the
    renames left (weights 2, config 1, config 2 beside it), no later kill may lose adapter 2."""
    template = tmp_path / "template"
    save(numbered(1 if start != "clean" else 2), template)
    if start != "clean":
        kill_after_weights_rename(savers, template, 2)
    assert loaded_copy(template, tmp_path) == 2
    total = savers.steps(template, 3)
    assert total >= 4
    seen = set()
    for step in range(1, total + 1):
        folder = tmp_path / f"kill-{step}"
        shutil.copytree(template, folder)
        savers.killed_at(folder, 3, step)
        seen.add(loaded_number(folder))
        leftovers(folder)
        save(numbered(4), folder)
        assert loaded_number(folder) == 4 and leftovers(folder) == {W, C}
        shutil.rmtree(folder)
    assert seen == {2, 3}


def test_random_kills_never_lose_the_adapter(savers: Savers, tmp_path: Path) -> None:
    """Item 1: 15 savers, each saving in a loop (the config changes with every save), killed at a
    random time: the folder loads each time, never to an older adapter than the last one seen,
    and killed saves do not pile up temporary files."""
    folder = tmp_path / "a"
    save(numbered(0), folder)
    rng = random.Random(1)
    last = 0
    for round_ in range(1, 16):
        pid = savers.start(folder, 100 * round_, count=-1)
        time.sleep(rng.uniform(0.0, 0.3))
        assert savers.kill(pid) == -signal.SIGKILL
        n = loaded_number(folder)
        assert n == last or 100 * round_ <= n < 100 * (round_ + 1), (n, last)
        last = n
        leftovers(folder)
    save(numbered(7), folder)
    assert loaded_number(folder) == 7 and leftovers(folder) == {W, C}


def test_concurrent_saves_and_loads(savers: Savers, tmp_path: Path) -> None:
    """Item 1: two processes save 12 adapters each into one folder at once, one the even numbers
    (rank 2), the other the odd ones (rank 4), so their saves differ in config, while this process
    loads the folder again and again. Both exit 0; every load gets one whole adapter; the folder
    ends as the last adapter of one of them."""
    folder = tmp_path / "a"
    save(numbered(0), folder)
    go = tmp_path / "go"
    pids = [savers.start(folder, first, count=12, stride=2, go=go) for first in (0, 1)]
    go.touch()
    loads = 0
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"steps-{first}").exists() for first in (0, 1)):
        assert time.monotonic() < deadline, "the savers did not finish"
        loaded_number(folder)
        loads += 1
    assert [savers.wait(pid) for pid in pids] == [0, 0]
    assert loads > 0
    assert loaded_number(folder) in (22, 23)
    assert leftovers(folder) == {W, C}


def test_copy_adapter_copies_the_pair_a_killed_save_committed(tmp_path) -> None:
    """Item 1 for copies (``LoraYOLO.save_adapter``): a folder left between the two renames of a
    save (new weights, old config, the new config beside it) copies as the new adapter, and the
    copy is a plain matching pair. Copying file by file gave the old config with the new weights."""
    old, new = numbered(1), numbered(2)  # consecutive numbers: different ranks, different configs
    lorakit.save_adapter(old, tmp_path / "old")
    lorakit.save_adapter(new, tmp_path / "new")
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "old", torn)
    shutil.copy(tmp_path / "new" / W, torn / W)
    shutil.copy(tmp_path / "new" / C, torn / ".adapter_config.json.new")
    with folder_lock(torn):  # a save is still "running": no reader finishes the rename now
        lorakit.copy_adapter(torn, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [C, W]
    assert (tmp_path / "copy" / C).read_bytes() == (tmp_path / "new" / C).read_bytes()
    model = base()
    lorakit.load_adapter(model, tmp_path / "copy")
    x = torch.randn(3, 32)
    assert torch.equal(model(x), new(x))


def test_save_with_also_writes_the_same_files_to_every_folder(tmp_path) -> None:
    """``save_adapter(..., also=[...])`` (a training run's best adapter when its last epoch is its best):
    every folder holds the bytes a save to it alone writes, and a folder with an older adapter is
    replaced as a save replaces it."""
    new = numbered(2)
    lorakit.save_adapter(numbered(1), tmp_path / "best")  # an older adapter there
    lorakit.save_adapter(new, tmp_path / "alone")
    assert lorakit.save_adapter(new, tmp_path / "last", also=[tmp_path / "best", str(tmp_path / "more")]) == (
        tmp_path / "last"
    )
    lorakit.save_adapter(new, tmp_path / "again", also=str(tmp_path / "one"))  # one folder as a str
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "alone", "best", "last", "more", "one"]
    for folder in ("last", "best", "more", "one"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == [C, W]
        for name in (C, W):
            assert (tmp_path / folder / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
