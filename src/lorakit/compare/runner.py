"""Run a comparison's missing strategies, each in a child interpreter, with a progress line per strategy.

The integration names a job module: ``python -m MODULE FOLDER STRATEGY`` must train
``STRATEGY`` on the run folder's ``settings.json`` and keep its result with
:meth:`~lorakit.compare.store.ResultStore.put`. A process per strategy makes each
peak memory that strategy's own, and a crash in one strategy leaves the others' results kept.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import StrategyFailedError
from .store import Progress, ResultStore


def run_job(folder: Path, name: str, module: str) -> None:
    """``python -m module folder name``, its output to ``folder/logs/NAME.log``.

    Raises:
        StrategyFailedError: it exited non-zero or kept no result (the log's last line is quoted).
    """
    log = folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", module, str(folder), name], stdout=f, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0 or not ResultStore.path_in(folder, name).is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise StrategyFailedError(
            f"compare: strategy {name!r} failed (exit status {proc.returncode}): {lines[-1] if lines else 'no output'}"
            f"; full log: {log}. Strategies finished before it are kept: run the same comparison again to go on"
        )


def run_missing(
    store: ResultStore,
    names: Sequence[str],
    module: str,
    summary: Callable[[dict[str, Any]], str],
    stream: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Run each of ``names`` that ``store`` has no result for (:func:`run_job`); return every result, in order.

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
        run_job(store.folder, name, module)
        progress.done(name, summary(store.get(name) or {}))
    return [store.get(n) or {} for n in names]
