"""Early checks of the Ultralytics settings of a YOLO run that otherwise fail deep inside it.

Ultralytics checks ``optimizer=`` when it builds the optimizer (after the
dataset is cached), ``format=`` and the exporter's packages once the model is
prepared for export, and ``device=`` when the trainer or predictor starts; each
failure is a traceback. :func:`check_settings` checks the same values up front
and raises :class:`~lorakit.errors.ConfigError` with one line naming the key,
the accepted values and the value given. :class:`~lorakit.yolo.LoraYOLO` and
``lorakit yolo`` call it before any work starts.

The accepted values are Ultralytics 8.4's (``BaseTrainer.build_optimizer``,
``Exporter.__call__`` and ``export_formats()``, ``select_device``). The
packages are those each export imports first; a format not in
:data:`FORMAT_MODULES`, or a package an export imports only for some options
(``nncf`` for OpenVINO INT8), still fails inside Ultralytics.

Importing this module does not import ultralytics.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

# BaseTrainer.build_optimizer's names (matched case-insensitively), minus MuSGD: Muon orthogonalises
# each 2-D/4-D tensor's update, LoRA's A and B included, which is not the low-rank update LoRA trains.
OPTIMIZERS = ("auto", "SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")
REFUSED_OPTIMIZERS = {"musgd": "Muon would orthogonalise the LoRA factors A and B"}

# Exporter.__call__'s aliases of the names in export_formats().
FORMAT_ALIASES = {
    "tensorrt": "engine",
    "trt": "engine",
    "mlmodel": "coreml",
    "mlpackage": "coreml",
    "mlprogram": "coreml",
    "apple": "coreml",
    "ios": "coreml",
    "huawei": "ascend",
    "cann": "ascend",
    "om": "ascend",
    "vitis": "xilinx",
    "vitisai": "xilinx",
    "versal": "xilinx",
    "tflite": "litert",
    "tfjs": "litert",
}

# The modules each export imports (Ultralytics 8.4's exporter and utils/export/*), as
# (import name, pip name). Ultralytics' own requirement check only warns when pip is off
# (YOLO_AUTOINSTALL=False, lorakit.yolo.offline), and then the import fails mid-export.
_TF = (("tensorflow", "tensorflow"), ("onnx2tf", "onnx2tf"))
FORMAT_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "onnx": (("onnx", "onnx"),),
    "openvino": (("openvino", "openvino"),),
    "engine": (("onnx", "onnx"), ("tensorrt", "tensorrt")),
    "coreml": (("coremltools", "coremltools"),),
    "coreai": (("coreai_torch", "coreai-torch"),),
    "saved_model": _TF,
    "pb": _TF,
    "edgetpu": _TF,
    "litert": (("litert_torch", "litert-torch"),),
    "paddle": (("x2paddle", "x2paddle"),),
    "mnn": (("MNN", "MNN"),),
    "ncnn": (("ncnn", "ncnn"), ("pnnx", "pnnx")),
    "imx": (("model_compression_toolkit", "model-compression-toolkit"),),
    "rknn": (("rknn", "rknn-toolkit2"),),
    "executorch": (("executorch", "executorch"),),
}

# Devices select_device hands to their own backends unchecked here (Ultralytics reports those).
_OTHER_BACKENDS = ("npu", "xpu", "tpu", "intel", "vulkan")
_DEVICES = "cpu, mps, cuda, cuda:N, N or N,M (CUDA indices), -1 (an idle GPU), npu:N or xpu:N"


def check_optimizer(value: Any) -> str:
    """The optimizer name as Ultralytics spells it (``"adamw"`` -> ``"AdamW"``).

    Raises:
        ConfigError: not one of :data:`OPTIMIZERS`, or MuSGD (named, with why).
    """
    name = str(value)
    if name.lower() in REFUSED_OPTIMIZERS:
        raise ConfigError(
            f"optimizer={value!r} is not supported with LoRA ({REFUSED_OPTIMIZERS[name.lower()]}); "
            f"expected one of {', '.join(OPTIMIZERS)}"
        )
    known = {o.lower(): o for o in OPTIMIZERS}
    if not isinstance(value, str) or name.lower() not in known:
        raise ConfigError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {value!r}")
    return known[name.lower()]


def export_formats() -> tuple[str, ...]:
    """The format names Ultralytics exports to (``export_formats()``, without PyTorch's own ``-``)."""
    from ultralytics.engine.exporter import export_formats as formats

    table: dict[str, tuple[Any, ...]] = formats()  # type: ignore[no-untyped-call]
    return tuple(str(f) for f in table["Argument"][1:])


def check_format(value: Any, *, modules: bool = True) -> str:
    """The export format's canonical name (aliases resolved: ``tflite`` -> ``litert``).

    Ultralytics would replace a near miss (``onxx``) by its guess with a warning;
    here it is refused, with the guess suggested.

    Args:
        value: the ``format=`` value.
        modules: also check that the packages the export imports are installed.

    Raises:
        ConfigError: an unknown format, or a missing package (naming it and its pip name).
    """
    formats = export_formats()
    fmt = str(value).lower()
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if not isinstance(value, str) or fmt not in formats:
        close = difflib.get_close_matches(str(value).lower(), [*formats, *FORMAT_ALIASES], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"format: expected one of {', '.join(formats)}, got {value!r}{hint}")
    if modules:
        missing = [(mod, pip) for mod, pip in FORMAT_MODULES.get(fmt, ()) if importlib.util.find_spec(mod) is None]
        if missing:
            names = " and ".join(f"{mod!r} (pip install {pip})" for mod, pip in missing)
            raise ConfigError(
                f"format={value!r} needs the Python package {names}, which is not installed; install it or "
                f"choose another format (torchscript needs nothing more)"
            )
    return fmt


def check_device(value: Any) -> None:
    """Refuse a CUDA or MPS device that is not there, or a device string Ultralytics cannot read.

    ``None`` or ``""`` (Ultralytics' automatic choice) and the other backends
    (``npu``, ``xpu``, ...) pass; Ultralytics checks those itself.

    Raises:
        ConfigError: naming ``device=``, what is available and the value given.
    """
    if value is None or value == "":
        return
    import torch

    if isinstance(value, torch.device) and value.type not in ("cpu", "cuda", "mps"):
        return  # select_device passes these through
    text = re.sub(r"[\s()\[\]'\"]", "", str(value).lower())
    if text == "cpu" or text.startswith(_OTHER_BACKENDS):
        return
    if text in ("mps", "mps:0"):
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={value!r}: MPS is not available here; use device=cpu")
        return
    ids = ["0"] if text == "cuda" else [i for i in text.replace("cuda:", "").split(",") if i]
    if not all(re.fullmatch(r"-1|\d+", i) for i in ids):
        raise ConfigError(f"device: expected {_DEVICES}, got {value!r}")
    ids = [i for i in ids if i != "-1"]  # -1: Ultralytics picks an idle GPU, or none (then the CPU)
    if not ids:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={value!r} asks for CUDA, which is not available here (torch.cuda.is_available() is False); "
            "use device=cpu"
        )
    from ultralytics.utils.torch_utils import parse_device

    # parse_device maps physical ids under CUDA_VISIBLE_DEVICES to torch indices, as the run will
    count = torch.cuda.device_count()
    if any(int(i) >= count for i in parse_device(",".join(ids)).split(",") if i):
        raise ConfigError(f"device={value!r}: there are {count} CUDA device(s) here (indices 0..{count - 1})")


def check_settings(settings: Mapping[str, Any], mode: str) -> None:
    """Check ``optimizer``, ``format`` and ``device`` in ``settings`` (the keyword arguments
    of a ``train``/``val``/``predict``/``export`` call), as the functions above do.

    ``format``'s packages are checked for ``mode="export"`` only: other modes ignore it.

    Raises:
        ConfigError: the first bad value, named.
    """
    if settings.get("optimizer") is not None:
        check_optimizer(settings["optimizer"])
    if settings.get("format") is not None:
        check_format(settings["format"], modules=mode == "export")
    check_device(settings.get("device"))
