"""A process that saves adapters to be killed: the kill tests of test_io_reliability.py.

Run as ``python -m tests.unit.io_saver``, it imports torch once and then forks one saver per
command (importing torch takes seconds; a fork, milliseconds), so a test can kill many real
processes mid-save. Commands on stdin, one reply line each on stdout:

    save FOLDER FIRST COUNT STRIDE KILL_AFTER STEPS_FILE GO_FILE   -> pid PID
        fork a saver writing numbered(FIRST), numbered(FIRST + STRIDE), ... to FOLDER (COUNT
        saves, -1: until killed). KILL_AFTER > 0: the saver SIGKILLs itself right after the
        KILL_AFTER-th file operation of its saves (see _count_steps); it writes the number
        of operations it did to STEPS_FILE when it ends alive. GO_FILE (or -): wait for that
        file to exist before the first save, so two savers start together.
    wait PID                                                 -> status CODE
        reap the saver; CODE as os.waitstatus_to_exitcode (-9: killed by SIGKILL).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit

# File operations a save is made of, at the os level: each is one kill point.
STEP_FUNCTIONS = ("open", "write", "fsync", "close", "replace", "rename", "unlink", "chmod")


def base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).eval()


def numbered(n: int) -> nn.Sequential:
    """Adapter number ``n``: rank 2 or 4 by parity (consecutive numbers differ in their config),
    A drawn from seed ``n``, every B entry equal to ``n``."""
    m = base()
    torch.manual_seed(1000 + n)
    lorakit.inject(m, lorakit.LoraConfig(r=2 + 2 * (n % 2), alpha=4, targets=["0", "1"], init="random"))
    with torch.no_grad():
        for layer in m:
            layer.lora["default"].B.fill_(float(n))
    return m


def _count_steps(kill_after: int) -> list[int]:
    """Wrap the os functions of STEP_FUNCTIONS so each call inside a save counts one step; the
    ``kill_after``-th step SIGKILLs this process right after it is done."""
    count = [0, 0]  # steps, and whether a save is running

    def wrap(name: str) -> None:
        real = getattr(os, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            if count[1]:
                count[0] += 1
                if count[0] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(os, name, step)

    for name in STEP_FUNCTIONS:
        wrap(name)
    return count


def _saver(folder: str, first: int, count: int, stride: int, kill_after: int, steps_file: str, go_file: str) -> None:
    steps = _count_steps(kill_after)
    if go_file != "-":
        while not os.path.exists(go_file):
            time.sleep(0.001)
    done = 0
    while count < 0 or done < count:
        model = numbered(first + stride * done)
        steps[1] = 1
        lorakit.save_adapter(model, folder)
        steps[1] = 0
        done += 1
    Path(steps_file).write_text(str(steps[0]))


def main() -> None:
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "save":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    folder, first, count, stride, kill_after, steps_file, go_file = args
                    _saver(folder, int(first), int(count), int(stride), int(kill_after), steps_file, go_file)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            print(f"pid {pid}", flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(args[0]), 0)
            print(f"status {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    main()
