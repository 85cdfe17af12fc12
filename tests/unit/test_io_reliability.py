"""Adapter files that are not regular files (item 8) and tensors of the wrong dtype (item 9): each
a typed error naming the file, and exit 2 with one line from the CLI. The issue's item numbers are
named in each test. (Item 1, killed and concurrent saves: test_io_save_kill.py.)
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
import safetensors.torch
import torch
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.io import load_adapter, save_adapter
from lorakit.io_errors import AdapterFileError, DtypeMismatchError

from .io_models import adapted_net, make_net, state_hash

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SRC = Path(lorakit.__file__).resolve().parents[1]
W = "adapter_model.safetensors"
C = "adapter_config.json"
A_KEY = "base_model.model.lin.lora_A.weight"


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


def rewrite_tensors(folder: Path, change: dict[str, torch.Tensor]) -> None:
    """Replace tensors of a saved adapter as another tool would (no lorakit metadata)."""
    tensors = safetensors.torch.load((folder / W).read_bytes())
    tensors.update(change)
    (folder / W).write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))


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


# -- item 9: dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.int32, "I32"), (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.float8_e4m3fn, "F8_E4M3")],
)
def test_factor_of_a_non_floating_dtype_is_refused(
    saved: Path, good: Path, dtype: torch.dtype, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 9: a LoRA factor stored as int32, bool, uint8 or float8 is refused (not cast) with a
    typed error naming file, key, expected and actual dtype; lorakit diff exits 2, not 1."""
    a = safetensors.torch.load((saved / W).read_bytes())[A_KEY]
    rewrite_tensors(saved, {A_KEY: (a * 10).to(dtype)})
    m = make_net()
    with pytest.raises(DtypeMismatchError) as err:
        load_adapter(m, saved)
    e = err.value
    assert (e.path, e.key, e.actual) == (saved / W, A_KEY, name)
    assert "F16, BF16, F32 or F64" in e.expected and A_KEY in str(e) and str(saved / W) in str(e)
    assert lorakit.list_adapters(m) == []
    assert main(["diff", f"a={good}", f"b={saved}"]) == 2
    assert name in one_error_line(capsys.readouterr().err, "diff")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_factors_load_cast_to_the_model(saved: Path, dtype: torch.dtype) -> None:
    """Item 9: the floating dtypes PEFT writes still load (cast to the model's float32)."""
    a = safetensors.torch.load((saved / W).read_bytes())[A_KEY]
    rewrite_tensors(saved, {A_KEY: a.to(dtype)})
    m = make_net()
    load_adapter(m, saved)
    assert torch.equal(m.lin.lora["default"].A, a.to(dtype).float())


def test_pickle_factor_of_an_integer_dtype_is_refused(saved: Path) -> None:
    """Item 9: the same rule for the opt-in pickle reader."""
    tensors = safetensors.torch.load((saved / W).read_bytes())
    tensors[A_KEY] = tensors[A_KEY].to(torch.int32)
    (saved / W).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    with pytest.raises(DtypeMismatchError, match="I32"):
        load_adapter(make_net(), saved, allow_pickle=True)


def test_integer_bias_is_refused(tmp_path: Path) -> None:
    """Item 9: a saved bias (bias="lora_only") stored as int32 is refused: the model's bias is floating."""
    folder = save_adapter(adapted_net(bias="lora_only"), tmp_path / "a")
    key = "base_model.model.lin.base_layer.bias"
    b = safetensors.torch.load((folder / W).read_bytes())[key]
    rewrite_tensors(folder, {key: (b * 100).to(torch.int32)})
    with pytest.raises(DtypeMismatchError) as err:
        load_adapter(make_net(), folder)
    assert (err.value.key, err.value.actual) == (key, "I32") and "F32" in err.value.expected


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.inp(x)))


def bn_net(trained: bool) -> BNNet:
    torch.manual_seed(0)
    m = BNNet().eval()
    if trained:
        lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, targets=["inp", "out"], train_modules=["bn"], init="random"))
        with torch.no_grad():  # as three training steps would leave them
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2.0)
            m.bn.num_batches_tracked.fill_(3)
    return m


def test_integer_buffers_of_train_modules_load(tmp_path: Path) -> None:
    """Item 9: a trained BatchNorm's int64 num_batches_tracked is saved and loads (integer where the
    model's tensor is integer); as float32 or int32 it is refused: the exact model dtype is required."""
    trained = bn_net(True)
    folder = save_adapter(trained, tmp_path / "a")
    key = "base_model.model.bn.num_batches_tracked"
    assert safetensors.torch.load((folder / W).read_bytes())[key].dtype == torch.int64
    m = bn_net(False)
    load_adapter(m, folder)
    x = torch.randn(5, 4)
    assert torch.equal(m(x), trained(x))
    counts = [b for name, b in m.named_buffers() if name.endswith("num_batches_tracked")]
    assert counts and all(b.dtype == torch.int64 and int(b) == 3 for b in counts)
    for dtype, name in [(torch.float32, "F32"), (torch.int32, "I32")]:
        bad = tmp_path / name
        save_adapter(trained, bad)
        rewrite_tensors(bad, {key: torch.tensor(3, dtype=dtype)})
        with pytest.raises(DtypeMismatchError) as err:
            load_adapter(bn_net(False), bad)
        assert (err.value.key, err.value.expected, err.value.actual) == (key, "I64", name)
