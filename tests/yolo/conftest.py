"""YOLO tests: Ultralytics offline, and any network access fails the test.

``offline.enable`` must run before ultralytics is imported, so test modules
here import ultralytics only inside fixtures and tests, never at the top.

The network guard wraps ``socket.getaddrinfo`` and ``socket.socket.connect``
(and ``connect_ex``) while each test module here runs, from before its module
fixtures are set up to after they are torn down: each call is recorded and refused
with ``OSError``. Refusing alone is not enough (Ultralytics' ``check_font``
swallows the error), so every test fails at teardown if anything was recorded
since the previous check, including during a module fixture's setup. The guard
is lifted between modules, so tests in other folders that run after these in the
same process (pytest-xdist mixes folders), such as tests/serve's servers on
127.0.0.1, are not refused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from yolo_helpers import NETWORK_REFUSED, assert_no_lorakit_class

from lorakit.yolo import offline

NETWORK_CALLS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def network_guard() -> Iterator[list[str]]:
    originals = (socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex)

    def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        NETWORK_CALLS.append(f"getaddrinfo{args}")
        raise OSError("network access blocked by tests/yolo/conftest.py")

    def connect(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        NETWORK_CALLS.append(f"connect{args}")
        raise OSError("network access blocked by tests/yolo/conftest.py")

    def connect_ex(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        NETWORK_CALLS.append(f"connect_ex{args}")
        raise OSError("network access blocked by tests/yolo/conftest.py")

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield NETWORK_CALLS
    finally:
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = originals  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def yolo_offline(yolo_config_dir: Path) -> str:
    """Offline Ultralytics with the session's private config dir (before any ultralytics import; it sets
    environment variables and copies a font, no network)."""
    return str(offline.enable(yolo_config_dir))


@pytest.fixture(autouse=True)
def no_network(network_guard: list[str]) -> Iterator[None]:
    yield
    calls = list(network_guard)
    network_guard.clear()
    if calls:
        pytest.fail(f"network access attempted: {calls}")


# Run by ``plain_ultralytics``: loads each checkpoint with lorakit unimportable and the network refused,
# checks that no lorakit/LoRA class was pickled, and predicts once with plain Ultralytics.
_LOAD_PLAIN = (
    NETWORK_REFUSED
    + """
sys.modules["lorakit"] = None  # any import of lorakit now raises ImportError
import torch
imgsz, paths = int(sys.argv[1]), sys.argv[2:]
for path in paths:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    bad = [type(m) for m in ckpt["model"].modules()]
    bad = [c for c in bad if "lorakit" in c.__module__ or c.__name__.startswith("Lora")]
    assert not bad, (path, bad)
from ultralytics import YOLO
for path in paths:
    res = YOLO(path).predict(torch.rand(1, 3, imgsz, imgsz), imgsz=imgsz, verbose=False)
    assert len(res) == 1, path
print("PLAIN-OK")
"""
)


@pytest.fixture(scope="session")
def plain_ultralytics(yolo_offline: str) -> Callable[..., None]:
    """``check(paths, imgsz=64)``: the checkpoints load and predict in plain Ultralytics, in a subprocess
    where importing lorakit fails (so a pickled lorakit class would show) and the network is refused."""

    def check(paths: Iterable[str | os.PathLike[str]], imgsz: int = 64) -> None:
        args = [str(p) for p in paths]
        for p in args:
            assert_no_lorakit_class(Path(p))
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_PLAIN, str(imgsz), *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0 and "PLAIN-OK" in proc.stdout, proc.stderr[-3000:]

    return check
