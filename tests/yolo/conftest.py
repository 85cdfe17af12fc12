"""YOLO tests: Ultralytics offline, and any network access fails the test.

``offline.enable`` must run before ultralytics is imported, so test modules
here import ultralytics only inside fixtures and tests, never at the top.

The network guard wraps ``socket.getaddrinfo`` and ``socket.socket.connect``
(and ``connect_ex``) for the whole session: each call is recorded and refused
with ``OSError``. Refusing alone is not enough (Ultralytics' ``check_font``
swallows the error), so every test fails at teardown if anything was recorded
since the previous check, including during a module fixture's setup.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lorakit.yolo import offline

NETWORK_CALLS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
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
def yolo_offline(network_guard: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Offline Ultralytics with a private config dir (before any ultralytics import)."""
    return str(offline.enable(tmp_path_factory.mktemp("yolo_config")))


@pytest.fixture(autouse=True)
def no_network(network_guard: list[str]) -> Iterator[None]:
    yield
    calls = list(network_guard)
    network_guard.clear()
    if calls:
        pytest.fail(f"network access attempted: {calls}")
