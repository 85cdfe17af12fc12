"""A comparison's run folder: one result file per finished strategy, and the progress line.

``<folder>/settings.json`` holds what every strategy shares (model, data, budget);
``<folder>/results/<strategy>.json`` one finished strategy's numbers, each written
atomically when that strategy ends. Running the comparison again in the same
folder keeps those and runs only the strategies still missing; a folder whose
settings differ is refused, so numbers from two budgets never share one table.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError
from ..io_format import atomic_write

SETTINGS = "settings.json"
RESULTS = "results"


class ResultStore:
    """The run folder of one comparison (see the module docstring).

    Args:
        folder: the run folder (made if missing).
        settings: what every strategy shares; JSON-serialisable.
        overwrite: discard the folder's kept results and settings first.

    Raises:
        ConfigError: the folder holds results of other settings (the keys that differ are named).
        OSError: the folder cannot be written.
    """

    def __init__(self, folder: Path, settings: Mapping[str, Any], overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(dict(settings)))  # what reading the file back gives
        if overwrite:
            shutil.rmtree(self.folder / RESULTS, ignore_errors=True)
            (self.folder / SETTINGS).unlink(missing_ok=True)
        file = self.folder / SETTINGS
        if file.is_file():
            old = json.loads(file.read_text(encoding="utf-8"))
            differ = sorted(k for k in {*old, *self.settings} if old.get(k) != self.settings.get(k))
            if differ:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {self.settings.get(k)!r} now" for k in differ)
                raise ConfigError(
                    f"{file}: this folder holds a comparison with other settings ({shown}); use another folder, "
                    "or overwrite=True to discard its results"
                )
        (self.folder / RESULTS).mkdir(parents=True, exist_ok=True)
        atomic_write(file, _dumps(self.settings))

    def path(self, name: str) -> Path:
        """The result file of strategy ``name``."""
        return self.path_in(self.folder, name)

    @staticmethod
    def path_in(folder: Path, name: str) -> Path:
        """Where strategy ``name``'s result is kept in run folder ``folder``."""
        return Path(folder) / RESULTS / f"{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        """Strategy ``name``'s kept result, or ``None`` when it has not finished here."""
        path = self.path(name)
        if not path.is_file():
            return None
        result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return result

    def put(self, name: str, result: Mapping[str, Any]) -> None:
        """Keep strategy ``name``'s result (atomic: the file is whole or absent)."""
        atomic_write(self.path(name), _dumps(dict(result)))


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def duration(seconds: float) -> str:
    """``95`` -> ``"1m35s"``; under a minute ``"12s"``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line per strategy as it starts and ends, with an ETA for the rest.

    The ETA is the mean time of the strategies finished so far (this run's, or the
    kept ones' recorded times) times the number still to run.
    """

    def __init__(self, names: list[str], todo: list[str], stream: TextIO | None = None) -> None:
        self.names, self.todo = names, list(todo)
        self.times: list[float] = []
        self.stream = stream or sys.stdout
        self._t0 = 0.0

    def _eta(self, left: int) -> str:
        if not left:
            return "done"
        if not self.times:
            return "ETA unknown until one strategy ends"
        return f"ETA {duration(sum(self.times) / len(self.times) * left)}"

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def kept(self, name: str, seconds: float | None) -> None:
        if seconds:
            self.times.append(seconds)
        self._say(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: kept from an earlier run")

    def start(self, name: str) -> None:
        self._t0 = time.perf_counter()
        self._say(f"[{self.names.index(name) + 1}/{len(self.names)}] {name}: running ({self._eta(len(self.todo))})")

    def done(self, name: str, summary: str) -> float:
        """Say ``name`` ended; return its wall time."""
        seconds = time.perf_counter() - self._t0
        self.times.append(seconds)
        self.todo.remove(name)
        i = self.names.index(name) + 1
        self._say(
            f"[{i}/{len(self.names)}] {name}: done in {duration(seconds)}: {summary} ({self._eta(len(self.todo))})"
        )
        return seconds
