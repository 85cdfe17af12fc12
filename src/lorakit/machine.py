"""What machine a measurement ran on: the CPU's model name, for tables that print figures."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows.

    Training figures depend on it: kernels differ in rounding between CPUs, so a run takes
    another path on another CPU.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
