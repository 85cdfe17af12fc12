"""Run a comparison's missing strategies, each in a child interpreter, with a progress line per strategy.

The integration names a job module: ``python -m MODULE FOLDER STRATEGY`` must train
``STRATEGY`` on the run folder's ``settings.json`` and keep its result with
:meth:`~lorakit.compare.store.ResultStore.put`. A process per strategy makes each
peak memory that strategy's own, and a crash in one strategy leaves the others' results kept.

``fork=True`` starts each job as a fork of this process calling the module's ``main([FOLDER,
STRATEGY])`` instead of a new interpreter: the libraries this process imported are not imported
again (transformers' Trainer takes 10 s of CPU to import, more than a small strategy's training).
A forked child cannot use CUDA once this process has initialised it (a notebook that ran a
model on the GPU), so then each job gets a new interpreter after all. The child's peak RSS
starts from what this process held when it forked.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import StrategyFailedError
from .store import Progress, ResultStore


def _forked_main(module: str, folder: str, name: str, log: str) -> None:
    """In the forked child: stdout and stderr to ``log``, then the job's ``main``; its return value
    is the exit status (an exception: 1, its traceback in the log)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # the parent's sys.stdout may be a test harness's capture object: write to the log's descriptors
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives as long as the child)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.exit(importlib.import_module(module).main([folder, name]))


def _fork(folder: Path, name: str, module: str, log: Path) -> int:
    """Run the job in a fork of this process; its exit status. Ctrl-C here stops the child too."""
    importlib.import_module(module)  # imported once, here, so every child inherits it
    sys.stdout.flush()
    sys.stderr.flush()
    child = multiprocessing.get_context("fork").Process(
        target=_forked_main, args=(module, str(folder), name, str(log)), name=f"compare-{name}"
    )
    child.start()
    try:
        child.join()
    except BaseException:
        child.terminate()
        child.join()
        raise
    return child.exitcode if child.exitcode is not None else 1


def _can_fork() -> bool:
    """``fork`` exists here and this process has not initialised CUDA (a forked child could not use it)."""
    if not hasattr(os, "fork"):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def run_job(folder: Path, name: str, module: str, fork: bool = False) -> None:
    """``python -m module folder name`` (``fork``: ``module.main([folder, name])`` in a fork of this
    process, where it can fork, see the module docstring), its output to ``folder/logs/NAME.log``.

    Raises:
        StrategyFailedError: it exited non-zero or kept no result (the log's last line is quoted).
    """
    log = folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if fork and _can_fork():
        code = _fork(folder, name, module, log)
    else:
        with open(log, "wb") as f:
            code = subprocess.run(
                [sys.executable, "-m", module, str(folder), name], stdout=f, stderr=subprocess.STDOUT, check=False
            ).returncode
    if code != 0 or not ResultStore.path_in(folder, name).is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise StrategyFailedError(
            f"compare: strategy {name!r} failed (exit status {code}): {lines[-1] if lines else 'no output'}"
            f"; full log: {log}. Strategies finished before it are kept: run the same comparison again to go on"
        )


def run_missing(
    store: ResultStore,
    names: Sequence[str],
    module: str,
    summary: Callable[[dict[str, Any]], str],
    stream: TextIO | None = None,
    fork: bool = False,
) -> list[dict[str, Any]]:
    """Run each of ``names`` that ``store`` has no result for (:func:`run_job`, ``fork`` as there);
    return every result, in order.

    Raises:
        StrategyFailedError: as :func:`run_job`; the results kept so far stay.
    """
    progress = Progress(list(names), [n for n in names if store.get(n) is None], stream)
    for name in names:
        kept = store.get(name)
        if kept is not None:
            progress.kept(name, kept.get("wall_s"))
            continue
        progress.start(name)
        run_job(store.folder, name, module, fork)
        progress.done(name, summary(store.get(name) or {}))
    return [store.get(n) or {} for n in names]
