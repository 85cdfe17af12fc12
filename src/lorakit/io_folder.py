"""An adapter folder's two files, written so that no kill and no concurrent save loses the
adapter, and read so that a config is only ever used with the weights it belongs to.

No file system renames two files at once, and a save replaces two:
``adapter_model.safetensors`` and ``adapter_config.json``. The weights name the config they
belong to (``lorakit_config_sha256`` in their header), and the protocol is built on that.
Beside the two files, only while a save runs or after one was killed::

    .adapter_model.safetensors.tmp   the new weights, while they are written
    .adapter_config.json.new         the new config, complete and fsynced before the weights are renamed
    .lorakit.lock                    the savers' lock file (removed when a save ends)

Save (:func:`write_adapter`) holds an exclusive ``fcntl.flock`` on the lock file, so the
savers of one folder (processes or threads) take turns; the OS drops a killed process's lock:

    0. finish or discard a killed save's leftovers (:func:`recover`)
    1. when the config changes: write and fsync ``.adapter_config.json.new``
    2. write and fsync ``.adapter_model.safetensors.tmp``; fsync the folder
    3. rename it over ``adapter_model.safetensors``; fsync the folder       (the commit point)
    4. rename ``.adapter_config.json.new`` over ``adapter_config.json``; fsync the folder

Killed before 3: the old pair is intact, and the side file is stale (its sha256 is not the
one the weights name). Killed between 3 and 4: the new weights name the side file's sha256;
readers use it (they roll forward), and the next save, or a reader that gets the lock
without waiting, renames it into place (PEFT, which checks no hash, then reads a matching
pair too). The leftovers have fixed names, so killed saves never pile up temporary files:
the next save removes them.

Read (:func:`read_pair`) takes no lock (a read-only folder must stay readable): the config,
then the weights; when the weights name another sha256, the side file, then the config
again; the first that matches is used. When none matches and neither file changed while it
was read, the pair really is mismatched (an edited config); when one changed (a save ran
meanwhile), the folder is read again, a bounded number of times.

Without ``fcntl`` (Windows) saves are not serialised: running one save per folder at a time
is then the caller's job; a killed save still leaves the old adapter or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .io_errors import AdapterFileError
from .io_format import MAX_JSON, MAX_WEIGHTS, file_id, fsync_dir, read_bytes, read_file, read_metadata, write_synced

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_TMP = f".{WEIGHTS_FILE}.tmp"
CONFIG_NEW = f".{CONFIG_FILE}.new"
LOCK_FILE = ".lorakit.lock"
SHA_KEY = "lorakit_config_sha256"
_READS = 20  # whole-folder reads before a reader gives up on a folder that keeps changing

Parsed = tuple[dict[str, torch.Tensor], dict[str, str]]


def config_sha(config: bytes) -> str:
    return hashlib.sha256(config).hexdigest()


def _acquire(path: Path, wait: bool) -> int | None:
    """The descriptor of ``path`` locked exclusively; None when another process holds it and
    ``wait`` is False; -1 when this file system has no locks (ENOLCK, EOPNOTSUPP, ...)."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            return -1
        # The holder before us removes the file before it unlocks: if it did so after we opened
        # it, we hold the lock of a file no longer in the folder, and must open the new one.
        mine, now = os.fstat(fd), file_id(path)
        if now is not None and now[:2] == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the save lock of ``folder``. Yields True, or False when ``wait`` is False and
    another process holds it. Without ``fcntl``, or on a file system without locks, yields
    True without locking. The lock file is removed when the lock is released.

    Raises:
        OSError: the lock file cannot be created (e.g. a read-only folder).
    """
    fd = -1 if fcntl is None else _acquire(folder / LOCK_FILE, wait)
    if fd is None or fd < 0:
        yield fd is not None
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_FILE)
        os.close(fd)


def recover(folder: Path) -> None:
    """Finish or discard the leftovers of a killed save (the caller holds :func:`folder_lock`).

    Removes a partial weights file; renames the side config into place when the weights
    name its sha256 and not the current config's (the save was killed after its commit
    point), else removes it. Raises OSError when a file cannot be renamed or removed.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / WEIGHTS_TMP)
    side = folder / CONFIG_NEW
    if not os.path.lexists(side):
        return
    try:
        want = read_metadata(folder / WEIGHTS_FILE).get(SHA_KEY)
        new = read_bytes(side, MAX_JSON)
        current = read_bytes(folder / CONFIG_FILE, MAX_JSON) if os.path.lexists(folder / CONFIG_FILE) else None
    except AdapterFileError:  # weights or side file unreadable: the side file cannot be trusted
        want = None
    if want is not None and config_sha(new) == want and (current is None or config_sha(current) != want):
        os.replace(side, folder / CONFIG_FILE)
        fsync_dir(folder)
    else:
        os.unlink(side)


def write_adapter(folder: Path, weights: bytes, config: bytes) -> None:
    """Replace the adapter in ``folder`` by ``weights`` and ``config`` (module docstring).

    Raises:
        OSError: a file cannot be written (the message names it). Before the commit point
            the previous adapter is kept; after it (only the config rename failed) the new
            weights and the side config stay, and loads use them.
    """
    weights_file, config_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    side, tmp = folder / CONFIG_NEW, folder / WEIGHTS_TMP
    target = weights_file
    try:
        with folder_lock(folder):
            recover(folder)
            try:
                changed = read_bytes(config_file, MAX_JSON) != config
            except AdapterFileError:  # missing or unreadable: write it
                changed = True
            try:
                if changed:
                    write_synced(side, config)
                write_synced(tmp, weights)
                fsync_dir(folder)
                os.replace(tmp, weights_file)
            except BaseException:
                for leftover in (tmp, side):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
                raise
            fsync_dir(folder)
            if changed:
                target = config_file
                os.replace(side, config_file)
                fsync_dir(folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {target}: {exc.strerror or exc}", str(target)) from exc


def _try_recover(folder: Path) -> None:
    """:func:`recover` when the lock is free now; never waits, never raises (read-only folders)."""
    with contextlib.suppress(OSError), folder_lock(folder, wait=False) as held:
        if held:
            recover(folder)


def _config(path: Path) -> bytes | AdapterFileError:
    """The bytes of config file ``path``, or why it cannot be read."""
    try:
        return read_bytes(path, MAX_JSON)
    except AdapterFileError as exc:
        return exc


def read_pair(config_file: Path, weights_file: Path, parse: Callable[[bytes], Parsed]) -> tuple[bytes, Parsed]:
    """The config bytes and the parsed weights (``parse(data)``) of one save (module docstring).

    Raises:
        AdapterFileError: a file is unreadable or malformed (from ``parse`` too); the config
            does not belong to the weights; the folder kept changing for 20 reads in a row.
    """
    side = config_file.parent / CONFIG_NEW
    for attempt in range(_READS):
        config = _config(config_file)
        data, seen = read_file(weights_file, MAX_WEIGHTS)
        parsed = parse(data)
        want = parsed[1].get(SHA_KEY)
        if isinstance(config, bytes) and (want is None or config_sha(config) == want):
            return config, parsed
        if want is None:
            assert isinstance(config, AdapterFileError)
            raise config
        new = _config(side)
        if isinstance(new, bytes) and config_sha(new) == want:  # a save killed (or running) after its commit point
            _try_recover(config_file.parent)
            return new, parsed
        again = _config(config_file)
        if isinstance(again, bytes) and config_sha(again) == want:
            return again, parsed
        if str(again) == str(config) and file_id(weights_file) == seen:  # nothing changed: no save is running
            if isinstance(config, AdapterFileError):
                raise config
            raise AdapterFileError(
                config_file,
                f"does not belong to {weights_file.name} (its sha256 is not the {SHA_KEY} the weights "
                "name: it was edited, or copied from another save); save the adapter again",
            )
        time.sleep(0.005 * (attempt + 1))
    raise AdapterFileError(
        config_file.parent, f"the adapter files changed during {_READS} reads in a row (a save running in a loop?)"
    )
