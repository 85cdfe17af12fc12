"""lorakit: LoRA fine-tuning for any PyTorch model.

LoRA freezes a model's weights ``W`` and trains a low-rank update per chosen
layer, ``W + s * B A`` (``B`` zero at the start, ``s = alpha / r``), so a layer
with ``out x in`` weights trains only ``r * (in + out)`` numbers.

Quick start::

    import lorakit
    report = lorakit.inject(model, lorakit.LoraConfig(r=8, targets=["q_proj", "v_proj"]))
    print(report.summary())            # trainable / total parameters
    ...train as usual...
    lorakit.merge_and_unload(model)    # plain model again, zero inference overhead

This module imports only torch (and nothing optional); integrations live in
``lorakit.yolo`` and ``lorakit.hf``.
"""

from ._version import __version__
from .adapters import (
    active_adapters,
    delete_adapter,
    disabled,
    list_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge,
)
from .combine import CombinedLayer, CombineReport, combine_adapters
from .config import LoraConfig
from .errors import (
    AdapterNotFoundError,
    ConfigError,
    LoraError,
    MetaTensorError,
    MixedBatchError,
    NonFiniteError,
    TargetError,
)
from .hotswap import HotswapReport, hotswap_adapter, prepare_hotswap
from .inject import InjectReport, Target, inject, lora_layers, select_targets
from .io import AdapterFiles, LoadReport, copy_adapter, load_adapter, read_adapter_files, save_adapter
from .io_errors import (
    AdapterConfigError,
    AdapterFileError,
    BaseModelMismatchError,
    KeyMismatchError,
    NonFiniteTensorError,
    ShapeMismatchError,
    UnsafeFormatError,
)
from .layers import LoraAdapter, LoraLayer
from .loraplus import loraplus_groups, loraplus_split
from .mixed import mixed_batch
from .registry import LayerHandler, handler_for, register

__all__ = [
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterFiles",
    "AdapterNotFoundError",
    "BaseModelMismatchError",
    "CombineReport",
    "CombinedLayer",
    "ConfigError",
    "HotswapReport",
    "InjectReport",
    "KeyMismatchError",
    "LayerHandler",
    "LoadReport",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "LoraLayer",
    "MetaTensorError",
    "MixedBatchError",
    "NonFiniteError",
    "NonFiniteTensorError",
    "ShapeMismatchError",
    "Target",
    "TargetError",
    "UnsafeFormatError",
    "__version__",
    "active_adapters",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "handler_for",
    "hotswap_adapter",
    "inject",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "loraplus_groups",
    "loraplus_split",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "prepare_hotswap",
    "read_adapter_files",
    "copy_adapter",
    "register",
    "save_adapter",
    "select_targets",
    "set_adapter",
    "unload",
    "unmerge",
]
