"""``lorakit yolo train|val|predict|export|merge key=value ...``: the Ultralytics verbs.

    lorakit yolo train   model=base.pt data=data.yaml epochs=20 imgsz=640 r=8
    lorakit yolo val     model=base.pt adapter=runs/detect/train/weights/best_adapter data=data.yaml
    lorakit yolo predict model=base.pt adapter=DIR source=images/
    lorakit yolo export  model=base.pt adapter=DIR format=onnx
    lorakit yolo merge   model=base.pt adapter=DIR out=merged.pt

The vocabulary is ``yolo``'s: every Ultralytics setting (``ultralytics.cfg``'s
``DEFAULT_CFG_DICT``: ``epochs``, ``imgsz``, ``conf``, ``format``, ...) passes
through unchanged to :class:`~lorakit.yolo.LoraYOLO`'s ``train``/``val``/
``predict``/``export``. On top of it: the LoRA settings (``train`` only; ``val``
and the others take them from the adapter file) and this command's own keys
(``adapter``, ``allow_other_base``, ``out``, ``overwrite``). ``dropout`` is
LoRA's: Ultralytics uses it for classifier heads only.

Every key and every value type is checked before Ultralytics is called, so a
typo (``epoch=5``) fails at once with the key and its close matches, instead of
deep inside a run.

Never downloads: Ultralytics runs in offline mode (:mod:`lorakit.yolo.offline`),
``model=`` must be a local ``.pt`` (or a ``.yaml`` Ultralytics ships), ``data=``
a local dataset whose images exist, ``source=`` local files.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli.args import ArgError, did_you_mean, parse_value
from ..config import LoraConfig, as_patterns
from ..errors import LoraError
from . import offline
from .checks import check_settings
from .cli_models import first_line, local_data, require_local

if TYPE_CHECKING:
    from .model import LoraYOLO

USAGE = """usage: lorakit yolo SUBVERB key=value ...

  train     train a LoRA adapter on a YOLO model (detect, segment, pose, obb, classify); writes merged
            best.pt/last.pt and the adapter folders
            lorakit yolo train model=base.pt|yolo26n.yaml data=data.yaml [epochs=100] [imgsz=640] [batch=16]
                  [r=8] [alpha=r] [dropout=0.0] [adapt_bn=True] [exclude=PATTERN,...] [adapter_name=default]
                  [max_fraction=1.0] [measure_forms=False] [frozen_stride=0]
                  [loraplus_ratio=None] [any other YOLO train setting]
  val       mAP of base + adapter (without adapter=, of the base)
            lorakit yolo val model=base.pt [adapter=DIR] data=data.yaml [imgsz=640] [batch=16] ...
  predict   detections of base + adapter; images saved under project/name unless save=False
            lorakit yolo predict model=base.pt [adapter=DIR] source=PATH [imgsz=640] [conf=0.25] [save=True] ...
  export    export base + adapter merged (zero LoRA overhead); the file is named after the adapter folder
            lorakit yolo export model=base.pt [adapter=DIR] [format=onnx] [imgsz=640] ...
  merge     write base + adapter as one plain Ultralytics .pt (loads without lorakit)
            lorakit yolo merge model=base.pt adapter=DIR out=merged.pt [overwrite=False]
  compare   train full, partial, head-only, LoRA (r=4, 8, 16), DoRA and LoRA+ on the same data and budget;
            one table (mAP, trainable params, bytes stored, s/epoch, memory, forgetting), plot and verdicts
            lorakit yolo compare model=base.pt data=data.yaml [epochs=20] [imgsz=640] [base_data=old.yaml]
                  [strategies=full,lora-r8,...] [out=runs/compare] [overwrite=False] [any other YOLO train setting]

  adapter=DIR is a folder written by train (runs/detect/NAME/weights/best_adapter); an adapter trained on
  other base weights is refused unless allow_other_base=True. Other keys: Ultralytics' own (yolo cfg).
  Nothing is downloaded: model .pt, data and source must be local.
"""

# LoRA settings (LoraYOLO's constructor): key -> (accepted types, what to write).
LORA_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "an int, e.g. r=8"),
    "alpha": ((int, float, type(None)), "a number or None, e.g. alpha=16"),
    "dropout": ((int, float), "a number, e.g. dropout=0.05"),
    "adapt_bn": ((bool,), "True or False"),
    "exclude": ((str, list, tuple), "a path pattern or a comma-separated list, e.g. exclude=model.0.conv"),
    "adapter_name": ((str,), "a name, e.g. adapter_name=cars"),
    "max_fraction": ((int, float), "a number, e.g. max_fraction=0.5"),
    "measure_forms": ((bool,), "True or False"),
    "loraplus_ratio": ((int, float, type(None)), "a number or None, e.g. loraplus_ratio=16"),
    "frozen_stride": ((int,), "an int >= 0, e.g. frozen_stride=4 (leave the stride-2 and stride-4 layers frozen)"),
}
# Ultralytics settings this command sets itself: the sub-verb is the mode; model= is opened here;
# dropout= is LoRA's; stream= would leave predict's results unconsumed.
NOT_PASSED = {"mode", "model", "dropout", "stream"}
ADAPTER_KEYS = {"adapter", "allow_other_base"}


def run(argv: list[str]) -> int:
    """Run ``lorakit yolo SUBVERB key=value ...``; returns the exit code (errors raise ArgError/LoraError)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    verbs: dict[str, Callable[[list[str]], int]] = {
        "train": _train,
        "val": _val,
        "predict": _predict,
        "export": _export,
        "merge": _merge,
        "compare": _compare,
    }
    verb = verbs.get(sub)
    if verb is None:
        raise ArgError(f"unknown yolo subverb {sub!r}{did_you_mean(sub, verbs, n=1)} (use {', '.join(verbs)})")
    # Before anything imports ultralytics: its import probes the network (see lorakit.yolo.offline).
    offline.enable()
    return verb(rest)


# ---------------------------------------------------------------------------------------- parsing


def ultralytics_keys() -> set[str]:
    """Every setting Ultralytics knows (its CLI, Python kwargs and YAML share them), minus :data:`NOT_PASSED`."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    return set(DEFAULT_CFG_DICT) - NOT_PASSED


def _value(text: str) -> Any:
    # As `yolo` does: true/false/none in any case; otherwise lorakit's safe literal parsing.
    special = {"true": True, "false": False, "none": None}
    return special[text.lower()] if text.lower() in special else parse_value(text)


def parse(argv: list[str], own: Collection[str], verb: str, ultralytics: bool = True) -> dict[str, Any]:
    """``key=value`` tokens -> dict, each key checked against ``own`` (plus Ultralytics' keys).

    Raises:
        ArgError: a token without ``=``, or an unknown key (named, with its close matches).
    """
    allowed = set(own) | (ultralytics_keys() if ultralytics else set())
    out: dict[str, Any] = {}
    for token in argv:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ArgError(f"yolo {verb}: expected key=value, got {token!r}")
        if key not in allowed:
            raise ArgError(_unknown(key, allowed, own, verb))
        out[key] = _value(value)
    return out


def _unknown(key: str, allowed: set[str], own: Collection[str], verb: str) -> str:
    msg = f"yolo {verb}: unknown key {key!r}"
    if key in LORA_KEYS and verb == "compare":
        return f"{msg}: compare sets LoRA settings per strategy (strategies=lora-r4,lora-r16,dora,loraplus,...)"
    if key in LORA_KEYS:
        return f"{msg}: LoRA settings are for 'yolo train'; {verb} reads them from the adapter= folder"
    hint = did_you_mean(key, allowed)
    if hint:
        return msg + hint
    extra = " and Ultralytics' settings (yolo cfg)" if len(allowed) > len(own) else ""
    return f"{msg}; known keys: {', '.join(sorted(own))}{extra}"


def _require(opts: dict[str, Any], keys: tuple[str, ...], verb: str, example: str) -> None:
    missing = [k for k in keys if opts.get(k) is None]
    if missing:
        raise ArgError(f"yolo {verb} needs {' and '.join(k + '=...' for k in missing)}, e.g. {example}")


def _flag(opts: dict[str, Any], key: str) -> bool:
    value = opts.pop(key, False)
    if not isinstance(value, bool):
        raise ArgError(f"{key}= must be True or False, got {value!r}")
    return value


def _split_lora(opts: dict[str, Any]) -> dict[str, Any]:
    """Take the LoRA settings out of ``opts``, type-checked (their ranges are LoraConfig's to check)."""
    lora = {k: opts.pop(k) for k in list(opts) if k in LORA_KEYS}
    for key, value in lora.items():
        types, expected = LORA_KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ArgError(f"{key}= must be {expected}, got {value!r} ({type(value).__name__})")
    if isinstance(lora.get("exclude"), (list, tuple)):
        lora["exclude"] = [str(p) for p in lora["exclude"]]
    if "exclude" in lora:  # exclude=model.0.conv is one pattern, not a list of characters
        lora["exclude"] = list(as_patterns("exclude", lora["exclude"]))
    if lora.get("max_fraction", 1.0) <= 0:
        raise ArgError(f"max_fraction= must be > 0 (1.0 keeps every conv), got {lora['max_fraction']!r}")
    # The ranges of r/alpha/dropout are LoraConfig's rules; check them now, not after the dataset is built.
    LoraConfig(r=lora.get("r", 8), alpha=lora.get("alpha"), dropout=lora.get("dropout", 0.0), target_types=("Conv2d",))
    return lora


def _check_settings(opts: dict[str, Any], verb: str) -> None:
    """Ultralytics' own type and range checks (``check_cfg``), and lorakit's of ``optimizer``,
    ``format`` (and its packages, for export) and ``device``: now rather than mid-run.

    Raises:
        ArgError: a type or range ``check_cfg`` refuses.
        ConfigError: a bad optimizer, format or device (:func:`~lorakit.yolo.checks.check_settings`).
    """
    from ultralytics.cfg import check_cfg

    try:
        check_cfg(dict(opts), hard=True)
    except (TypeError, ValueError) as exc:
        raise ArgError(first_line(exc)) from None
    check_settings(opts, verb)


# ---------------------------------------------------------------------------------------- inputs


def _local_source(value: Any) -> Any:
    """``source=``: local files, folders or globs (or a webcam index); never a URL or stream."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # a webcam index
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(item, str):
            raise ArgError(f"source= must be a file, folder or glob, got {item!r}")
        if "://" in item:
            raise ArgError(
                f"source={item!r}: URLs and streams are not read (lorakit never downloads); give local files"
            )
        if not Path(item).exists() and not glob.glob(item):
            raise ArgError(f"source={item!r}: no such file, folder or matching glob")
    return value


def _open(opts: dict[str, Any], lora: dict[str, Any] | None = None) -> LoraYOLO:
    """``LoraYOLO(model=...)`` with ``adapter=`` loaded (checked against the base); pops the keys it uses."""
    spec = opts.pop("model")
    if not isinstance(spec, str):
        raise ArgError(f"model= must be a .pt or .yaml path, got {spec!r}")
    require_local(spec)
    from .model import LoraYOLO

    task = opts.pop("task", None)
    try:
        model = LoraYOLO(spec, task=task, **(lora or {}))
    except LoraError:
        raise
    except (FileNotFoundError, NotImplementedError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        # What Ultralytics raises for a file that is not a YOLO checkpoint/config, and LoraYOLO for non-detectors.
        raise ArgError(f"model={spec!r}: cannot open it as a YOLO detector: {first_line(exc)}") from None
    adapter = opts.pop("adapter", None)
    allow_other_base = _flag(opts, "allow_other_base")
    if adapter is not None:
        model.load_adapter(Path(str(adapter)), allow_other_base=allow_other_base)
    return model


# ---------------------------------------------------------------------------------------- verbs


def _train(argv: list[str]) -> int:
    opts = parse(argv, {"model", *LORA_KEYS}, "train")
    _require(opts, ("model", "data"), "train", "lorakit yolo train model=base.pt data=data.yaml epochs=20")
    lora = _split_lora(opts)
    if opts.get("resume"):
        raise ArgError("resume= is not supported with LoRA (checkpoints hold merged weights); start a new run")
    _check_settings(opts, "train")
    opts["data"] = local_data(opts["data"])
    spec = opts["model"]
    model = _open(opts, lora)
    model.train(**opts)  # ends by printing where the checkpoints and adapter folders are
    if model.adapter_dir is not None:
        print(f"next: lorakit yolo val model={spec} adapter={model.adapter_dir} data={opts['data']}")
    return 0


def _val(argv: list[str]) -> int:
    opts = parse(argv, {"model", *ADAPTER_KEYS}, "val")
    _require(opts, ("model", "data"), "val", "lorakit yolo val model=base.pt adapter=DIR data=data.yaml")
    _check_settings(opts, "val")
    opts["data"] = local_data(opts["data"])
    model = _open(opts)
    metrics = model.val(**opts)
    box = metrics.box
    what = f"adapter {model.active_adapter!r}" if model.active_adapter else "the base model"
    print(f"mAP50-95 {box.map:.4f}  mAP50 {box.map50:.4f}  ({what}, data={opts['data']})")
    return 0


def _predict(argv: list[str]) -> int:
    opts = parse(argv, {"model", *ADAPTER_KEYS}, "predict")
    _require(opts, ("model", "source"), "predict", "lorakit yolo predict model=base.pt adapter=DIR source=images/")
    opts["source"] = _local_source(opts["source"])
    opts.setdefault("save", True)  # as `yolo predict` does
    _check_settings(opts, "predict")
    model = _open(opts)
    images = detections = 0
    # stream=True: one result at a time, so a large folder does not pile up in memory.
    for result in model.predict(stream=True, **opts):
        n = 0 if result.boxes is None else len(result.boxes)
        images, detections = images + 1, detections + n
        print(f"{result.path}: {n} detection{'s' if n != 1 else ''}")
    saved = getattr(model.predictor, "save_dir", None) if opts["save"] else None
    where = f"; results saved to {saved}" if saved is not None else ""
    print(f"{images} image{'s' if images != 1 else ''}, {detections} detections{where}")
    return 0


def _export(argv: list[str]) -> int:
    opts = parse(argv, {"model", *ADAPTER_KEYS}, "export")
    _require(opts, ("model",), "export", "lorakit yolo export model=base.pt adapter=DIR format=onnx")
    _check_settings(opts, "export")
    model = _open(opts)
    exported = model.export(**opts)  # named after the adapter folder (LoraYOLO.export)
    print(f"exported ({opts.get('format', 'torchscript')}): {exported}")
    return 0


def _merge(argv: list[str]) -> int:
    opts = parse(argv, {"model", "adapter", "allow_other_base", "out", "overwrite"}, "merge", ultralytics=False)
    _require(opts, ("model", "adapter", "out"), "merge", "lorakit yolo merge model=base.pt adapter=DIR out=merged.pt")
    out = Path(str(opts.pop("out")))
    overwrite = _flag(opts, "overwrite")
    if out.suffix != ".pt":
        raise ArgError(f"out={str(out)!r} must end with .pt (a plain Ultralytics checkpoint)")
    if out.is_dir():
        raise ArgError(f"out={str(out)!r} is a folder")
    if not out.parent.is_dir():
        raise ArgError(f"out={str(out)!r}: folder {str(out.parent)!r} does not exist")
    if out.exists() and not overwrite:
        raise ArgError(f"out={str(out)!r} exists; pass overwrite=True to replace it")
    if out.exists() and out.resolve() == Path(str(opts["model"])).resolve():
        raise ArgError(f"out={str(out)!r} is the base model itself; the adapter could no longer be loaded on it")
    spec, adapter = str(opts["model"]), str(opts["adapter"])
    model = _open(opts)
    try:
        model.save_merged(out)  # atomic: temp file, fsync, rename
    except OSError as exc:
        raise ArgError(f"out={str(out)!r}: cannot write it: {exc.strerror or exc}") from None
    print(f"merged {adapter} into {spec}: wrote {out} ({out.stat().st_size:,} bytes), a plain Ultralytics .pt")
    return 0


def _compare(argv: list[str]) -> int:
    opts = parse(argv, {"model", "data", "base_data", "strategies", "out", "overwrite"}, "compare")
    _require(opts, ("model", "data"), "compare", "lorakit yolo compare model=base.pt data=data.yaml epochs=20")
    overwrite = _flag(opts, "overwrite")
    from .comparison import compare

    model, data = opts.pop("model"), opts.pop("data")
    if not isinstance(model, str):
        raise ArgError(f"model= must be a .pt or .yaml path, got {model!r}")
    result = compare(
        model,
        data,
        base_data=opts.pop("base_data", None),
        strategies=opts.pop("strategies", None),
        out=str(opts.pop("out", "runs/compare")),
        overwrite=overwrite,
        **opts,  # epochs, imgsz and Ultralytics' other settings, checked by compare
    )
    print("\n" + result.markdown)
    print(f"wrote {result.folder / 'results.md'}, results.json, results.png")
    return 0
