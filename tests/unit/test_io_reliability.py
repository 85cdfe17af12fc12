"""Adapter files that are not regular files (item 8), tensors of the wrong dtype (item 9), and
malformed configs, metadata and CLI input that raised raw tracebacks (item 10): each a typed
error naming the file, and exit 2 with one line from the CLI. The issue's item numbers are named
in each test. (Item 1, killed and concurrent saves: test_io_save_kill.py.)
"""

from __future__ import annotations

import hashlib
import json
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
from lorakit.io import load_adapter, read_adapter_files, save_adapter
from lorakit.io_errors import AdapterConfigError, AdapterFileError, DtypeMismatchError, UnsafeFormatError

from .io_models import adapted_net, join_header, make_net, split_header, state_hash

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SRC = Path(lorakit.__file__).resolve().parents[1]
W = "adapter_model.safetensors"
C = "adapter_config.json"
BASE = "base=tests.unit.io_models:make_net"
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


def edit_metadata(folder: Path, **entries: object) -> None:
    """Set ``__metadata__`` entries in the weights file's header, everything else kept."""
    header, body = split_header((folder / W).read_bytes())
    meta = header["__metadata__"]
    assert isinstance(meta, dict)
    meta.update(entries)
    (folder / W).write_bytes(join_header(header, body))


def edit_config(folder: Path, **changes: object) -> None:
    """Change adapter_config.json and keep it belonging to the weights (the crafted file passes the hash check)."""
    cfg = json.loads((folder / C).read_text())
    cfg.update(changes)
    text = json.dumps(cfg).encode()
    (folder / C).write_bytes(text)
    edit_metadata(folder, lorakit_config_sha256=hashlib.sha256(text).hexdigest())


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


# -- item 10: typed errors instead of tracebacks -----------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"exclude_modules": 5}, "exclude_modules must be a regex string or a list of names, got 5"),
        ({"exclude_modules": ["emb", 3]}, "exclude_modules"),
        ({"modules_to_save": "lin"}, "modules_to_save must be a list of module names, got 'lin'"),
        ({"modules_to_save": 5}, "modules_to_save"),
    ],
)
def test_config_field_of_a_wrong_type(
    saved: Path, tmp_path: Path, changes: dict[str, object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 10: config fields of the wrong JSON type are AdapterConfigErrors naming the field (a
    string modules_to_save was read letter by letter), and exit 2 from lorakit merge."""
    edit_config(saved, **changes)
    with pytest.raises(AdapterConfigError, match=message) as err:
        load_adapter(make_net(), saved)
    assert str(saved / C) in str(err.value)
    out = tmp_path / "m.safetensors"
    assert main(["merge", BASE, f"adapter={saved}", f"out={out}"]) == 2
    assert message in one_error_line(capsys.readouterr().err, "merge") and not out.exists()


GOOD_FP = {"dtype": "float32", "shape": [6, 8], "crc32": "00000000", "samples": [0.0] * 16, "norm": 1.0}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"lorakit_base": json.dumps({"lin": {**GOOD_FP, "shape": 5}})}, r"lorakit_base\['lin'\].shape must be"),
        ({"lorakit_base": json.dumps({"lin": {**GOOD_FP, "dtype": "f16", "norm": [1]}})}, r"\.norm must be a number"),
        ({"lorakit_base": json.dumps({"lin": {**GOOD_FP, "dtype": "f16", "samples": ["x"]}})}, r"\.samples must be"),
        ({"lorakit_base": json.dumps({"lin": {**GOOD_FP, "crc32": 5}})}, r"\.crc32 must be a string"),
        ({"lorakit_base": json.dumps({"lin": [1]})}, r"lorakit_base\['lin'\] must be a JSON object"),
        ({"lorakit_base": "[1]"}, "lorakit_base is not a JSON object"),
        ({"lorakit_checksums": '{"k": 1}'}, "lorakit_checksums is not a JSON object of strings"),
        ({"lorakit_checksums": "[]"}, "lorakit_checksums is not a JSON object of strings"),
        ({"lorakit_config_sha256": 5}, "__metadata__ must map strings to strings"),
    ],
)
def test_crafted_lorakit_metadata(
    saved: Path, tmp_path: Path, entries: dict[str, object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 10: lorakit_* header entries of the wrong types are AdapterFileErrors naming the file and
    field, even with allow_other_base (a malformed file, not another base), and exit 2 from lorakit merge."""
    edit_metadata(saved, **entries)
    m = make_net()
    with pytest.raises(AdapterFileError, match=message) as err:
        load_adapter(m, saved, allow_other_base=True)
    assert str(saved / W) in str(err.value) and lorakit.list_adapters(m) == []
    out = tmp_path / "m.safetensors"
    assert main(["merge", BASE, f"adapter={saved}", f"out={out}", "allow_other_base=True"]) == 2
    assert str(saved / W) in one_error_line(capsys.readouterr().err, "merge")


def test_merge_factory_that_raises(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 10: a base factory that raises is one line naming the spec and the error, exit 2."""
    out = tmp_path / "m.safetensors"
    assert main(["merge", "base=tests.unit.io_models:failing_net", f"adapter={saved}", f"out={out}"]) == 2
    line = one_error_line(capsys.readouterr().err, "merge")
    assert "tests.unit.io_models:failing_net" in line and "RuntimeError: cannot build the model" in line


@pytest.mark.parametrize("verb", ["merge", "diff"])
def test_verb_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 10: ``lorakit merge --help`` (and diff) print the verb's usage and exit 0."""
    for flag in ("--help", "-h"):
        assert main([verb, flag]) == 0
        assert f"lorakit {verb} " in capsys.readouterr().out


def test_pickle_hint_names_the_python_api(saved: Path, good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 10: refusing a pickle file, the hint names what can read it: the Python API's
    allow_pickle. No CLI verb takes allow_pickle=, so the CLI must not suggest it as a key."""
    tensors = safetensors.torch.load((saved / W).read_bytes())
    (saved / W).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    with pytest.raises(UnsafeFormatError) as err:
        read_adapter_files(saved)
    assert "from Python with lorakit.load_adapter(..., allow_pickle=True)" in str(err.value)
    assert main(["diff", f"a={good}", f"b={saved}"]) == 2
    assert "from Python" in one_error_line(capsys.readouterr().err, "diff")
    for verb, args in [("diff", [f"a={good}", f"b={saved}"]), ("merge", [BASE, f"adapter={saved}", "out=x"])]:
        assert main([verb, *args, "allow_pickle=True"]) == 2
        assert "unknown key 'allow_pickle'" in capsys.readouterr().err
