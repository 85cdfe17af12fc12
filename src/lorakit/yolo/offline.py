"""Run Ultralytics with zero network access.

Ultralytics probes the network when it is *imported* (``is_online()`` resolves
two DNS names and the import writes ``settings.json``), and again on every
``train``/``val`` (``check_font("Arial.ttf")`` sends an HTTP HEAD to GitHub
that ``YOLO_OFFLINE`` does not gate and whose failure it swallows). So the
switches below must be set **before** ``import ultralytics``::

    from lorakit.yolo import offline
    offline.enable()                 # first, before anything imports ultralytics
    from lorakit.yolo import LoraYOLO

What :func:`enable` sets, and why:

* ``YOLO_OFFLINE=1``: ``is_online()`` returns False without a DNS lookup; this
  also turns off AutoUpdate and telemetry.
* ``YOLO_CONFIG_DIR=<private dir>``: settings, fonts and DDP temp files go
  there instead of ``~/.config/Ultralytics``. A temp dir made here
  (``lorakit-yolo-*``) is removed when the process exits, also on an error.
  It starts with a copy of the user's own ``settings.json`` (see
  :func:`user_settings_file`), so their settings (``runs_dir``, ``datasets_dir``,
  ``tensorboard``, ...) hold while their file is only read: Ultralytics writes
  to (and may migrate) the copy, never the user's file.
* ``YOLO_AUTOINSTALL=False``: never ``pip install`` anything (requirement
  checks; a checkpoint that pickles an unknown module makes
  ``torch_safe_load`` try to pip-install that module's name).
* a copy of matplotlib's DejaVuSans as ``Arial.ttf`` and ``Arial.Unicode.ttf``
  in the config dir, so ``check_font`` finds a font and never downloads one.

Models must then be ``.yaml`` files or local ``.pt`` files, and data YAMLs
local (``yolo26n.pt`` or ``coco8.yaml`` by name would be downloaded).

Where runs land: Ultralytics' default ``runs_dir`` is ``<git root>/runs``, where
the git root is that of the folder *ultralytics is installed in* (a virtual
environment inside a clone makes every run land in ``<clone>/runs``, from any
folder), else the current folder. :func:`runs_project` gives ``LoraYOLO`` the
``project=`` that puts runs under ``./runs`` instead, unless the user chose a
``runs_dir`` in their settings.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False"}


def _matplotlib_font() -> Path:
    # matplotlib is a dependency of ultralytics; importing it does not import ultralytics.
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def is_enabled() -> bool:
    """True when the offline switches are set in ``os.environ``."""
    return all(os.environ.get(k) == v for k, v in _ENV.items()) and bool(os.environ.get("YOLO_CONFIG_DIR"))


def enable(config_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make Ultralytics run with no network access; call before ``import ultralytics``.

    Args:
        config_dir: the private Ultralytics config dir (``YOLO_CONFIG_DIR``).
            ``None`` keeps an already set ``YOLO_CONFIG_DIR`` or makes a new temp dir,
            removed when this process exits (normally or by an uncaught error).

    Returns:
        The ``Ultralytics`` folder inside the config dir (where the fonts are).

    Raises:
        RuntimeError: ``ultralytics`` is already imported and the switches were
            not set before: its import-time network probe and settings have
            already run, so offline mode can no longer be guaranteed.
    """
    if "ultralytics" in sys.modules and not is_enabled():
        raise RuntimeError(
            "lorakit.yolo.offline.enable() must run before ultralytics is imported "
            "(the import itself probes the network); call it first, or set YOLO_OFFLINE=1, "
            "YOLO_AUTOINSTALL=False and YOLO_CONFIG_DIR in the environment"
        )
    if config_dir is None:
        config_dir = os.environ.get("YOLO_CONFIG_DIR") or _temp_config_dir()
    if "ultralytics" in sys.modules and Path(config_dir) != Path(os.environ["YOLO_CONFIG_DIR"]):
        raise RuntimeError(
            f"ultralytics is already imported with YOLO_CONFIG_DIR={os.environ['YOLO_CONFIG_DIR']!r}; "
            f"it cannot switch to {str(config_dir)!r}"
        )
    os.environ.update(_ENV)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    ul_dir = Path(config_dir) / "Ultralytics"
    ul_dir.mkdir(parents=True, exist_ok=True)
    font = _matplotlib_font()
    for name in FONT_NAMES:
        if not (ul_dir / name).exists():
            shutil.copyfile(font, ul_dir / name)
    return ul_dir


def _temp_config_dir() -> str:
    """A new ``lorakit-yolo-*`` temp dir, removed at this process's exit.

    Registered before ultralytics is imported, so it runs after any exit handler
    Ultralytics registers (they run last-in, first-out). Only the process that made
    it removes it: a forked child that exits through ``sys.exit`` leaves it to its parent.
    """
    path = tempfile.mkdtemp(prefix="lorakit-yolo-")
    atexit.register(_remove, path, os.getpid())
    user = user_settings_file()
    if user.is_file():
        try:
            data = user.read_bytes()
        except OSError:  # unreadable: Ultralytics' defaults, as for a user without settings
            return path
        (Path(path) / "Ultralytics").mkdir()
        (Path(path) / "Ultralytics" / "settings.json").write_bytes(data)
    return path


def user_settings_file() -> Path:
    """The user's own Ultralytics ``settings.json``: where Ultralytics looks without ``YOLO_CONFIG_DIR``
    (``get_user_config_dir``: ``$XDG_CONFIG_HOME`` or ``~/.config`` on Linux, ``~/Library/Application
    Support`` on macOS, ``~/AppData/Roaming`` on Windows). It may not exist."""
    if sys.platform == "win32":
        root = Path.home() / "AppData" / "Roaming"
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support"
    else:
        root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "Ultralytics" / "settings.json"


def runs_project(task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``project`` made ``<cwd>/runs/<task>[/<project>]`` when the Ultralytics settings'
    ``runs_dir`` is Ultralytics' default (the user did not choose one) and ``project`` is not absolute.

    Ultralytics' default is ``<git root of its install folder or cwd>/runs`` (see the module
    docstring), and it puts a relative ``project`` under ``runs_dir/<task>``; lorakit uses
    ``./runs`` as that ``runs_dir``, so a run lands in ``./runs/detect/train``. A ``runs_dir`` the
    user set in their settings, an absolute ``project`` and ``resume`` (the run's own folder) are kept.
    """
    from ultralytics.utils import SETTINGS

    project = str(kwargs.get("project") or "")
    if kwargs.get("resume") or Path(project).is_absolute() or SETTINGS["runs_dir"] != SETTINGS.defaults["runs_dir"]:
        return kwargs
    return {**kwargs, "project": str(Path.cwd() / "runs" / task / project)}


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
