"""Server tests: Ultralytics offline, and the network refused except loopback (the tests talk to their
own server on 127.0.0.1). ``offline.enable`` runs before anything imports ultralytics."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorakit.yolo import offline

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(scope="session", autouse=True)
def loopback_only(yolo_config_dir: Path) -> Iterator[None]:
    offline.enable(yolo_config_dir)
    originals = (socket.getaddrinfo, socket.socket.connect)
    refused: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK:
            refused.append(f"getaddrinfo({host!r})")
            raise OSError("network access blocked by tests/serve/conftest.py")
        return originals[0](host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            refused.append(f"connect({address!r})")
            raise OSError("network access blocked by tests/serve/conftest.py")
        return originals[1](self, address)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.getaddrinfo, socket.socket.connect = originals  # type: ignore[method-assign]
    assert not refused, f"network access attempted: {refused}"
