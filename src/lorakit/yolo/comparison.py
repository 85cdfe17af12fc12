"""``lorakit yolo compare`` / :func:`compare`: which way to adapt a YOLO model fits this data, measured.

::

    from lorakit.yolo import compare
    result = compare("base.pt", "data.yaml", epochs=20, imgsz=640, base_data="old.yaml")
    result.rows          # one dict per strategy: mAP, trainable, bytes stored, s/epoch, memory, forgetting
    print(result.markdown)

Every strategy (:data:`~lorakit.yolo.comparison_job.CATALOGUE`: ``full``,
``partial``, ``head``, ``lora-rN``, ``dora``, ``loraplus``) trains on the same
data with the same budget and Ultralytics settings, each through the trainer its
single-strategy command uses, in its own interpreter
(:mod:`lorakit.yolo.comparison_job`; its output goes to ``logs/STRATEGY.log``).
``optimizer="auto"`` therefore means Ultralytics' choice for the plain
strategies and AdamW lr 0.007 for the LoRA family, as in ``yolo train`` and
``lorakit yolo train``.

The run folder (``out``, default ``runs/compare``) keeps each finished strategy
(:mod:`lorakit.compare.store`), so running the same comparison again runs only
what is missing; at the end it holds ``results.json``, ``results.md`` and
``results.png`` (accuracy against bytes stored per task).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..compare.report import (
    BYTES,
    MEMORY,
    SPEED,
    TRAINABLE,
    Axis,
    Column,
    Comparison,
    Layout,
    cost_columns,
    epochs_text,
    fmt_bytes,
    fmt_float,
    write_report,
)
from ..compare.runner import run_missing
from ..compare.store import ResultStore
from ..errors import ConfigError, StrategyFailedError, did_you_mean
from . import offline
from .comparison_job import CATALOGUE, PLAIN

# Ultralytics settings compare sets itself: each strategy's run folder, its frozen layers, and the model and data.
RESERVED = {"project", "name", "exist_ok", "resume", "freeze", "model", "data", "mode", "epochs", "imgsz"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_train_args(train: dict[str, Any], epochs: Any, imgsz: Any) -> None:
    """Refuse the settings compare sets itself and unknown keys; Ultralytics' and lorakit's value checks.

    Raises:
        ConfigError: a reserved or unknown key (with close matches), a bad value.
    """
    from ultralytics.cfg import check_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    from .checks import check_settings
    from .cli_models import first_line

    for key in train:
        if key in RESERVED:
            raise ConfigError(f"compare: {key}= is set by compare itself (per strategy); leave it out")
        if key not in DEFAULT_CFG_DICT:
            raise ConfigError(f"compare: unknown setting {key!r}{did_you_mean(key, DEFAULT_CFG_DICT)}")
    try:
        check_cfg({**train, "epochs": epochs, "imgsz": imgsz}, hard=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"compare: {first_line(exc)}") from None
    check_settings(train, "train")


def _check_model(path: Path, names: list[str]) -> None:
    """The model opens as a YOLO detector, and ``partial`` can find its backbone.

    Raises:
        ConfigError: it does not.
    """
    from .comparison_job import frozen_layers
    from .measure import open_yolo

    try:
        model = open_yolo(path)
    except (FileNotFoundError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"model={str(path)!r}: cannot open it as a YOLO model: {exc}") from None
    if model.task != "detect":
        raise ConfigError(f"model={str(path)!r}: compare supports detection models, this one's task is {model.task!r}")
    if "partial" in names:
        frozen_layers(model.model, "partial")


def compare(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    epochs: int = 20,
    imgsz: int = 640,
    base_data: str | os.PathLike[str] | None = None,
    strategies: str | Sequence[str] | None = None,
    out: str | os.PathLike[str] = "runs/compare",
    overwrite: bool = False,
    stream: TextIO | None = None,
    **train: Any,
) -> Comparison:
    """Train each strategy on ``data`` with the same budget; measure and compare them (module docstring).

    Args:
        model: the base, a local ``.pt`` (or a ``.yaml`` Ultralytics ships: random weights).
        data: the new task's data YAML.
        epochs, imgsz: the budget, the same for every strategy.
        base_data: the base's own task's data YAML: adds its accuracy after adaptation (forgetting).
        strategies: names (a list or ``"full,lora-r8"``); default ``CATALOGUE.default``.
        out: the run folder; a comparison run there before with the same settings goes on from it.
        overwrite: discard the results kept in ``out`` first.
        stream: where the progress lines go (default stdout).
        train: other Ultralytics training settings (``batch``, ``device``, ``lr0``...), for every strategy.

    Returns:
        The :class:`Comparison`; ``results.json``, ``results.md`` and ``results.png`` are in ``out``.

    Raises:
        ConfigError: an unknown strategy (with close names), a reserved or bad setting, a folder
            holding another comparison; all before any training.
        ArgError: a model, data or base_data that is not a local file (or a dataset without its images).
        StrategyFailedError: a strategy's training failed (the finished ones are kept).
    """
    names = CATALOGUE.pick(strategies)
    offline.enable()  # before anything imports ultralytics
    from .cli_models import local_data, require_local

    _check_train_args(train, epochs, imgsz)
    require_local(str(model))
    model_path = Path(model).resolve() if Path(model).exists() else Path(model)
    data_path = Path(local_data(str(data))).resolve()
    base_path = Path(local_data(str(base_data), "base_data")).resolve() if base_data is not None else None
    _check_model(model_path, names)
    settings = {
        "model": str(model_path),
        "model_sha256": _sha256(model_path) if model_path.is_file() else None,
        "data": str(data_path),
        "base_data": str(base_path) if base_path else None,
        "epochs": epochs,
        "imgsz": imgsz,
        "train": train,
    }
    folder = Path(out).resolve()
    store = ResultStore(folder, settings, overwrite=overwrite)
    if base_path is not None and store.get("base") is None:
        from .comparison_job import run_base

        store.put("base", run_base(folder, store.settings))  # no training, no memory measured: in this process
    results = run_missing(store, names, "lorakit.yolo.comparison_job", _summary, stream)
    return _report(folder, settings, [_row(r) for r in results], store.get("base") or {})


def _summary(r: dict[str, Any]) -> str:
    """The progress line's account of a finished strategy."""
    return f"mAP50-95 {r['map50_95']:.3f}, {r['trainable']:,} trainable, {fmt_bytes(r['stored_bytes'])} stored"


def _row(result: dict[str, Any]) -> dict[str, Any]:
    """A result as a table row: every column present (``None``: not measured for this strategy)."""
    row = {k: result.get(k) for k in (*ROW_KEYS, *FORGETTING_KEYS)}
    row["trainable_fraction"] = result["trainable"] / result["total_params"]
    return row


ROW_KEYS = (
    "strategy",
    "method",
    "map50_95",
    "map50",
    "trainable",
    "total_params",
    "stored",
    "stored_bytes",
    "epoch_s",
    "train_s",
    "peak_mem_mib",
    "memory",
    "freeze",
    "adapted_layers",
    "wall_s",
)
FORGETTING_KEYS = ("base_map50_95_adapted", "base_map50_adapted", "base_map50_95_off", "base_map50_off")


def _columns(rows: list[dict[str, Any]], forgetting: bool) -> list[Column]:
    cols = [
        Column("strategy", "strategy"),
        Column("map50_95", "mAP50-95", fmt_float(3)),
        Column("map50", "mAP50", fmt_float(3)),
        *cost_columns(rows),
    ]
    if forgetting:
        cols += [
            Column("base_map50_95_adapted", "base mAP50-95, adapted", fmt_float(3)),
            Column("base_map50_95_off", "base mAP50-95, adapter off", fmt_float(3)),
        ]
    return cols


ACCURACY = Axis("map50_95", "Most accurate (mAP50-95)", "max", fmt_float(3))
AXES = (
    ACCURACY,
    Axis("map50", "Most accurate (mAP50)", "max", fmt_float(3)),
    TRAINABLE,
    BYTES,
    SPEED,
    MEMORY,
    Axis("base_map50_95_adapted", "Least forgetting (base mAP50-95 after adaptation)", "max", fmt_float(3)),
)


def _report(folder: Path, settings: dict[str, Any], rows: list[dict[str, Any]], base: dict[str, Any]) -> Comparison:
    forgetting = settings["base_data"] is not None
    base = {**base, "bytes": Path(settings["model"]).stat().st_size if Path(settings["model"]).is_file() else None}
    t = settings["train"]
    notes = [
        "Stored per task: `full` the whole checkpoint (fp16 .pt), `partial`/`head` the layers they train "
        "(fp32 safetensors), the LoRA family its adapter folder (fp32 safetensors + JSON)"
        + (f"; the base model itself is {fmt_bytes(base['bytes'])}." if base["bytes"] else "."),
    ]
    if forgetting:
        notes += [
            "",
            f"Base task (`{settings['base_data']}`): the base model scores mAP50-95 {base['base_map50_95']:.3f}. "
            "'adapted' is the fine-tuned model (LoRA family: the adapter merged) on it, 'adapter off' the LoRA "
            "model with its adapter disabled, which is the base.",
        ]
    ys = [("map50_95", "mAP50-95 on the new data")]
    if forgetting:
        ys.append(("base_map50_95_adapted", "mAP50-95 on the base data, adapted"))
    layout = Layout(
        title="lorakit yolo compare",
        intro=f"Base `{settings['model']}`, data `{settings['data']}`, {epochs_text(settings['epochs'])} at imgsz "
        f"{settings['imgsz']}"
        + (", " + " ".join(f"{k}={v}" for k, v in t.items()) if t else "")
        + "; every strategy with the same data, budget and settings, each in its own process (so peak memory, "
        "peak RSS on CPU or CUDA max allocated on a GPU, is that strategy's own).",
        columns=_columns(rows, forgetting),
        notes=notes,
        axes=AXES,
        gain=ACCURACY,
        cost=BYTES,
        ys=ys,
        plot_title=f"{settings['data']}: accuracy vs bytes stored per task ({epochs_text(settings['epochs'])})",
    )
    return write_report(folder, settings, base, rows, layout)


__all__ = ["CATALOGUE", "PLAIN", "Comparison", "StrategyFailedError", "compare"]
