"""One strategy of ``lorakit yolo compare``, trained and measured in its own interpreter.

``python -m lorakit.yolo.comparison_job FOLDER STRATEGY`` reads the comparison's
``FOLDER/settings.json`` (:mod:`lorakit.compare.store`), trains ``STRATEGY`` with
the trainer the single-strategy commands use (Ultralytics' own for ``full``,
``partial`` and ``head``; :class:`~lorakit.yolo.LoraYOLO`'s for the LoRA family), every
one with lorakit's trainer speed-ups, as a LoRA run has them
(:class:`~lorakit.yolo.speed.SpeedMixin`: the times then differ by strategy, not by trainer),
and keeps its result as ``FOLDER/results/STRATEGY.json``. A process per strategy
makes each peak memory that strategy's own. :func:`run_base` (not a strategy)
measures the base model on ``base_data``.

What each strategy stores per task (``stored``): ``full`` the whole checkpoint
(``best.pt``, as Ultralytics saves it: fp16); ``partial`` and ``head`` the layers
they train (fp32 safetensors; the frozen layers, BatchNorm statistics included,
are the base's); the LoRA family the adapter folder (fp32 safetensors + JSON).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..compare.store import ResultStore
from ..compare.strategies import Catalogue
from ..errors import ConfigError

LORA_R = 8  # the rank of dora and loraplus: LoraYOLO's default, so they differ from lora-r8 in one thing only
LORAPLUS_RATIO = 16.0  # the LoRA+ paper's choice
CATALOGUE = Catalogue(
    fixed={
        "full": "full fine-tuning",
        "partial": "backbone frozen (Ultralytics freeze= of the backbone layers)",
        "head": "head only (every layer but the Detect head frozen)",
        "dora": f"DoRA, r={LORA_R} (LoRA's targets; grouped and depthwise convs are never adapted)",
        "loraplus": f"LoRA+, r={LORA_R}, B factors at {LORAPLUS_RATIO:g}x the lr",
    },
    families={"lora-r": "LoRA, r={r}"},
    default=("full", "partial", "head", "lora-r4", "lora-r8", "lora-r16", "dora", "loraplus"),
)
PLAIN = ("full", "partial", "head")


def frozen_layers(model: Any, strategy: str) -> int:
    """Ultralytics' ``freeze=`` for a plain strategy: layers ``0 .. n-1`` frozen (0: none).

    ``partial``: the backbone (the model YAML's ``backbone`` list); ``head``: every layer but the last.
    """
    if strategy == "full":
        return 0
    if strategy == "head":
        return len(model.model) - 1
    yaml = getattr(model, "yaml", None)
    backbone = yaml.get("backbone") if isinstance(yaml, dict) else None
    if not backbone:
        raise ConfigError("strategies=partial: the model's YAML has no 'backbone' list, so its backbone is unknown")
    return len(backbone)


def lora_options(strategy: str, base: str) -> dict[str, Any]:
    """:class:`~lorakit.yolo.LoraYOLO` keywords of a LoRA-family strategy."""
    family = CATALOGUE.rank(strategy)
    if family is not None:
        return {"r": family[1]}
    if strategy == "loraplus":
        return {"r": LORA_R, "loraplus_ratio": LORAPLUS_RATIO}
    if strategy == "dora":
        import dataclasses

        from .measure import open_yolo
        from .targets import detector_config

        # LoraYOLO's own targets with DoRA on; detector_config leaves out grouped and depthwise convs,
        # which DoRA refuses (lorakit.variants).
        return {"config": dataclasses.replace(detector_config(open_yolo(base).model, r=LORA_R), dora=True)}
    raise ValueError(f"not a LoRA-family strategy: {strategy!r}")


def _val_args(settings: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    train = settings["train"]
    keep = {k: train[k] for k in ("batch", "device", "workers", "half", "conf", "iou", "max_det") if k in train}
    return {
        **keep,
        "imgsz": settings["imgsz"],
        "plots": False,
        "verbose": False,
        "project": str(folder / "val"),
        "name": name,
        "exist_ok": True,
    }


def _maps(metrics: Any) -> tuple[float, float]:
    return float(metrics.box.map), float(metrics.box.map50)


def run_base(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The base model's accuracy on ``base_data`` (the reference for forgetting)."""
    from .measure import open_yolo

    m = open_yolo(settings["model"]).val(data=settings["base_data"], **_val_args(settings, folder, "base"))
    b, b50 = _maps(m)
    return {"base_map50_95": b, "base_map50": b50}


def _store_trained_layers(best: Any, first: int, path: Path) -> Path:
    """Layers ``first ..`` of ``best`` (the run's best model; fp32 safetensors): what a partly frozen run changed."""
    from ..io_format import atomic_write, safetensors_bytes

    sd = best.model.state_dict()
    kept = {k: v.float().contiguous() for k, v in sd.items() if int(k.split(".")[1]) >= first}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, safetensors_bytes(kept))
    return path


def run_strategy(folder: Path, settings: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Train ``strategy`` on ``settings``' data and budget; measure it (see the module docstring)."""
    from ..compare.measure import peak_memory, size
    from .measure import EpochMeter, open_yolo
    from .model import LoraYOLO
    from .speed import with_speedups

    t_start = time.perf_counter()
    # An interrupted earlier try of this strategy left files but no result: start from nothing, so no
    # checkpoint, adapter or resume state of that try can end up in this one's numbers.
    for stale in (folder / "train" / strategy, folder / "val" / strategy):
        shutil.rmtree(stale, ignore_errors=True)
    (folder / "stored" / f"{strategy}.safetensors").unlink(missing_ok=True)
    train = {
        **settings["train"],
        "epochs": settings["epochs"],
        "imgsz": settings["imgsz"],
        "project": str(folder / "train"),
        "name": strategy,
        "exist_ok": True,
    }
    freeze = 0
    if strategy in PLAIN:
        model = open_yolo(settings["model"])
        freeze = frozen_layers(model.model, strategy)
        if freeze:
            train["freeze"] = freeze
        train["trainer"] = with_speedups(model.task_map[model.task]["trainer"])
    else:
        model = LoraYOLO(settings["model"], **lora_options(strategy, settings["model"]))
    meter = EpochMeter(model)
    t0 = time.perf_counter()
    metrics = model.train(data=settings["data"], **train)
    train_s = time.perf_counter() - t0
    memory, memory_kind = peak_memory(model.trainer.device)
    best = Path(model.trainer.best)
    plain = open_yolo(best)  # merged for the LoRA family: the model a user deploys
    if strategy == "full":
        stored = best
    elif strategy in PLAIN:
        stored = _store_trained_layers(plain, freeze, folder / "stored" / f"{strategy}.safetensors")
    else:
        stored = Path(model.adapter_dir)
    m, m50 = _maps(metrics)
    result: dict[str, Any] = {
        "strategy": strategy,
        "method": CATALOGUE.describe(strategy),
        "freeze": freeze,
        "trainable": meter.trainable,
        "total_params": sum(p.numel() for p in plain.model.parameters()),
        "stored": str(stored.relative_to(folder)),
        "stored_bytes": size(stored),
        "epoch_s": meter.epoch_seconds(),
        "train_s": train_s,
        "peak_mem_mib": memory,
        "memory": memory_kind,
        "map50_95": m,
        "map50": m50,
    }
    if strategy not in PLAIN:
        result["adapted_layers"] = len(model.trainer.lora_report.targets)
    if settings.get("base_data"):
        result.update(_forgetting(folder, settings, strategy, plain, stored))
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _forgetting(folder: Path, settings: dict[str, Any], strategy: str, best: Any, stored: Path) -> dict[str, Any]:
    """Accuracy on ``base_data`` after adaptation: adapted (``best``, the fine-tuned model; for the LoRA
    family base + adapter merged) and, for the LoRA family, with the adapter off (which must be the base's)."""
    from .model import LoraYOLO

    args = _val_args(settings, folder, strategy)
    data = settings["base_data"]
    if strategy in PLAIN:
        a, a50 = _maps(best.val(data=data, **args))
        return {"base_map50_95_adapted": a, "base_map50_adapted": a50}
    model = LoraYOLO(settings["model"], adapter=stored)
    a, a50 = _maps(model.val(data=data, **args))
    with model.adapter_disabled():
        off, off50 = _maps(model.val(data=data, **args))
    return {"base_map50_95_adapted": a, "base_map50_adapted": a50, "base_map50_95_off": off, "base_map50_off": off50}


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.yolo.comparison_job FOLDER STRATEGY``: run one job, keep its result."""
    folder_arg, strategy = argv if argv is not None else sys.argv[1:]
    folder = Path(folder_arg)
    from . import offline

    offline.enable()  # the parent's switches and config dir, inherited through the environment
    settings: dict[str, Any] = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    ResultStore(folder, settings).put(strategy, run_strategy(folder, settings, strategy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
