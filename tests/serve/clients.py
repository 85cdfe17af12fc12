"""Concurrent HTTP clients for the server tests: a pool of threads sharing out the jobs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any


def run_clients(client: Callable[[Sequence[Any]], None], jobs: Sequence[Any], n: int = 6, timeout: float = 120) -> None:
    """Run ``client`` on ``n`` threads at once, thread ``i`` taking ``jobs[i::n]``; wait for all.

    Raises:
        AssertionError: a thread was still running after ``timeout`` seconds (a hung request).
    """
    threads = [threading.Thread(target=client, args=(jobs[i::n],)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a client still runs after {timeout} s"
