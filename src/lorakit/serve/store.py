"""The adapter store: adapters by name from one folder, loaded on first use into a memory-bounded LRU.

``AdapterStore(root, loader, budget_bytes=...)`` serves the adapter folders directly under
``root`` (``root/NAME/adapter_config.json`` + ``adapter_model.safetensors``) by ``NAME``:

* Names cannot leave ``root``: a name is one plain path component (letters, digits, ``_``,
  ``-``, ``.``; no ``..``, no ``/``, not absolute), and the folder and its two files must resolve
  inside ``root`` (a symlink out of it is refused as a bad name, as ``..`` is).
* ``with store.use(name) as entry:`` gives the loaded adapter (``entry.value``, what ``loader``
  made of the folder) and its ``entry.version``: the sha256 of the content that was loaded
  (the config and every tensor, as :func:`~lorakit.io_read.read_adapter_files` reads them).
* A changed file (its inode, size or mtime differ) is loaded again on the next ``use``; the new
  version replaces the old one in the cache at once, while requests already holding the old
  entry finish on it: an entry's value is never modified, only dropped when nobody uses it.
* Memory: each entry counts the bytes the loader reports. When a new entry would exceed the
  budget, the least recently used entries that are neither pinned nor in use are evicted; when
  that does not free enough, the request gets :class:`~lorakit.serve.errors.CacheFullError`
  (a full cache never evicts a pinned or in-use adapter). The new value exists before it is
  counted, so memory can briefly exceed the budget by one adapter while it is checked.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from ..errors import LoraError
from ..io_errors import AdapterFileError
from ..io_folder import CONFIG_FILE, WEIGHTS_FILE
from ..io_format import FileId, byte_view, file_id
from ..io_read import AdapterFiles, read_adapter_files
from .errors import AdapterLoadError, AdapterNameError, CacheFullError, UnknownAdapterError

T = TypeVar("T")
# A loader turns an adapter folder into what requests use, and says how many bytes that holds.
Loader = Callable[[str, Path], tuple[T, int]]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_LOAD_TRIES = 5  # a folder saved again during every one of these loads is reported, not retried forever


@dataclass(eq=False)
class Entry(Generic[T]):
    """One loaded version of an adapter. ``value`` is never changed once made."""

    name: str
    version: str
    value: T
    nbytes: int
    stamp: tuple[FileId | None, FileId | None]
    refs: int = 0
    stale: bool = False  # replaced by a newer version or evicted: dropped when ``refs`` reaches 0


@dataclass
class StoreStats:
    """Counters for ``/metrics``."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    evictions: int = 0
    reloads: int = 0
    loaded: dict[str, str] = field(default_factory=dict)  # name -> version of the cached entries
    bytes: int = 0
    budget: int = 0


def content_version(files: AdapterFiles) -> str:
    """The sha256 of an adapter's content: its config (canonical JSON) and every tensor's name,
    dtype, shape and bytes. Two folders with the same content have the same version."""
    h = hashlib.sha256(json.dumps(files.raw_config, sort_keys=True).encode())
    for key in sorted(files.tensors):
        t = files.tensors[key]
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(byte_view(t).numpy().tobytes())
    return h.hexdigest()


class AdapterStore(Generic[T]):
    """Adapters of folder ``root`` by name, loaded by ``loader`` on first use (module docstring).

    Args:
        root: the store folder; each adapter is a subfolder.
        loader: ``loader(name, folder) -> (value, nbytes)``; an error it raises reaches the
            request as :class:`AdapterLoadError` (the store keeps serving other adapters).
        budget_bytes: the most bytes the cached values may hold together.
        pinned: names loaded by :meth:`preload` and never evicted.
        unload: called with a value once it is dropped and no request holds it (e.g. to free
            the adapter's slot in a shared model); default: nothing (the garbage collector).

    Raises:
        ConfigError: ``root`` is not a folder; ``budget_bytes`` is not a positive int; a pinned
            name is not a valid name (:class:`AdapterNameError`).
    """

    def __init__(
        self,
        root: str | Path,
        loader: Loader[T],
        *,
        budget_bytes: int,
        pinned: Iterable[str] = (),
        unload: Callable[[T], None] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AdapterNameError(f"adapters={str(self.root)!r}: expected an existing folder of adapter folders")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise AdapterNameError(f"budget_bytes: expected a positive int, got {budget_bytes!r}")
        self._real_root = self.root.resolve()
        self._loader = loader
        self._unload = unload
        self.budget = budget_bytes
        self.pinned = frozenset(pinned)
        for name in self.pinned:
            self._check_name(name)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry[T]] = OrderedDict()  # LRU order: oldest first
        self._loading: dict[str, threading.Lock] = {}
        self._held_bytes = 0  # cached entries plus stale ones still in use
        self.stats = StoreStats(budget=budget_bytes)

    # ------------------------------------------------------------------ names

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise AdapterNameError(
                f"adapter name {name!r}: expected one plain folder name of the store (letters, digits, '_', '-', "
                "'.'; no '/', no '..', at most 128 characters)"
            )
        return name

    def folder(self, name: object) -> Path:
        """The folder of adapter ``name``.

        Raises:
            AdapterNameError: not a plain name, or its folder or files resolve outside the store.
            UnknownAdapterError: no adapter folder of that name (with the names there are).
        """
        name = self._check_name(name)
        path = self.root / name
        if not (path / CONFIG_FILE).exists():
            raise UnknownAdapterError(name, self.names())
        if not self._inside(path):
            raise AdapterNameError(f"adapter name {name!r} leads out of the store {str(self.root)!r} (a symlink)")
        return path

    def _inside(self, folder: Path) -> bool:
        """The folder and its two files resolve inside the store (symlinks followed), and it is not the store."""
        real = folder.resolve()
        files = [(real / f).resolve() for f in (CONFIG_FILE, WEIGHTS_FILE)]
        return real != self._real_root and all(p.is_relative_to(self._real_root) for p in (real, *files))

    def names(self) -> list[str]:
        """The adapter names in the store now (folders with an ``adapter_config.json`` inside the store)."""
        out = []
        for p in sorted(self.root.iterdir()):
            named = _NAME.fullmatch(p.name) and ".." not in p.name and (p / CONFIG_FILE).is_file()
            if named and self._inside(p):
                out.append(p.name)
        return out

    # ------------------------------------------------------------------ use

    def preload(self) -> None:
        """Load the pinned adapters now (at start-up), so their first request costs no load.

        Raises:
            The errors of :meth:`use` for a pinned adapter that is missing or cannot be loaded.
        """
        for name in sorted(self.pinned):
            with self.use(name):
                pass

    @contextmanager
    def use(self, name: object) -> Iterator[Entry[T]]:
        """The loaded adapter ``name`` (its current version) for the duration of the block.

        Raises:
            AdapterNameError, UnknownAdapterError: as :meth:`folder`.
            AdapterLoadError: its files are corrupt or the loader failed (message names the file).
            CacheFullError: it does not fit the budget beside the pinned and in-use adapters.
        """
        entry = self._acquire(self._check_name(name))
        try:
            yield entry
        finally:
            self._release(entry)

    @staticmethod
    def _stamp(folder: Path) -> tuple[FileId | None, FileId | None]:
        return file_id(folder / CONFIG_FILE), file_id(folder / WEIGHTS_FILE)

    def _hit(self, name: str, stamp: tuple[FileId | None, FileId | None]) -> Entry[T] | None:
        """The cached entry when its files did not change (taking a reference), else None. Holds the lock."""
        e = self._entries.get(name)
        if e is None or e.stamp != stamp:
            return None
        e.refs += 1
        self._entries.move_to_end(name)
        return e

    def _acquire(self, name: str) -> Entry[T]:
        folder = self.folder(name)
        with self._lock:
            e = self._hit(name, self._stamp(folder))
            if e is not None:
                self.stats.hits += 1
                return e
            self.stats.misses += 1
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # one load per name at a time; the others wait and then find it cached
            with self._lock:
                e = self._hit(name, self._stamp(folder))
                if e is not None:
                    return e
            value, nbytes, version, stamp = self._load(name, folder)
            return self._insert(Entry(name, version, value, nbytes, stamp, refs=1))

    def _load(self, name: str, folder: Path) -> tuple[T, int, str, tuple[FileId | None, FileId | None]]:
        last: Exception | None = None
        for _ in range(_LOAD_TRIES):
            stamp = self._stamp(folder)
            try:
                version = content_version(read_adapter_files(folder))
                value, nbytes = self._loader(name, folder)
            except (LoraError, OSError, RuntimeError, ValueError, KeyError) as exc:
                last = exc
                if self._stamp(folder) != stamp:  # saved again while it was read: read the new one
                    continue
                break
            if self._stamp(folder) == stamp:  # neither file changed: value and version are one content
                self.stats.loads += 1
                return value, nbytes, version, stamp
            if self._unload is not None:
                self._unload(value)
        with self._lock:
            self.stats.load_errors += 1
        if isinstance(last, AdapterFileError):
            raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {last}") from None
        if last is not None:
            raise AdapterLoadError(f"adapter {name!r} ({folder}) cannot be loaded: {type(last).__name__}: {last}")
        raise AdapterLoadError(f"adapter {name!r} ({folder}) changed during {_LOAD_TRIES} loads in a row")

    def _insert(self, new: Entry[T]) -> Entry[T]:
        dropped: list[Entry[T]] = []
        try:
            with self._lock:
                old = self._entries.pop(new.name, None)
                if old is not None:
                    old.stale = True
                    self.stats.reloads += 1
                    if old.refs == 0:
                        dropped.append(old)
                        self._held_bytes -= old.nbytes
                need = self._held_bytes + new.nbytes - self.budget
                for e in list(self._entries.values()):  # oldest first
                    if need <= 0:
                        break
                    if e.refs == 0 and e.name not in self.pinned:
                        del self._entries[e.name]
                        e.stale = True
                        dropped.append(e)
                        self._held_bytes -= e.nbytes
                        need -= e.nbytes
                        self.stats.evictions += 1
                if need > 0:
                    busy = [e.name for e in self._entries.values()]
                    if old is not None and old.refs > 0:  # the old version stays for its requests, uncached
                        busy.append(f"{old.name} (previous version, in use)")
                    dropped.append(new)
                    raise CacheFullError(
                        f"adapter {new.name!r} needs {new.nbytes} bytes; the budget is {self.budget} bytes and "
                        f"{self._held_bytes} are held by pinned or in-use adapters {busy}; retry later"
                    )
                self._entries[new.name] = new
                self._held_bytes += new.nbytes
                return new
        finally:
            for e in dropped:
                if self._unload is not None:
                    self._unload(e.value)

    def _release(self, entry: Entry[T]) -> None:
        drop = False
        with self._lock:
            entry.refs -= 1
            if entry.stale and entry.refs == 0:
                self._held_bytes -= entry.nbytes
                drop = True
        if drop and self._unload is not None:
            self._unload(entry.value)

    def snapshot(self) -> StoreStats:
        """A copy of the counters, with the cached names and versions and the bytes held now."""
        with self._lock:
            s = self.stats
            return StoreStats(
                s.hits, s.misses, s.loads, s.load_errors, s.evictions, s.reloads,
                {n: e.version for n, e in self._entries.items()}, self._held_bytes, self.budget,
            )  # fmt: skip
