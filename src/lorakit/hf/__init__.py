"""transformers integration: Conv1D layers, partial fused projections, default targets,
Trainer support and the ``lorakit hf`` command.

Importing this package registers the handler for transformers' ``Conv1D`` (GPT-2);
lorakit's registry imports it by itself the first time it meets a ``Conv1D``
(``lorakit.registry.LAZY``), so ``lorakit.inject(gpt2, ...)`` just works.

    lorakit.hf.default_targets(model)        per-family target names (lorakit.hf.targets)
    lorakit.hf.lora_config(model, r=16)      a LoraConfig with those, heads kept out
    lorakit.hf.target_fused(model, "c_attn", parts=("q", "v"))    LoRA on part of a fused layer
    lorakit.hf.LoraTrainer                   Trainer whose checkpoints and save_model hold the adapter only
    lorakit.hf.AdapterCheckpointCallback     saves the adapter into each Trainer checkpoint
    lorakit.hf.prepare_for_training(model)   gradient checkpointing that reaches the adapters
    lorakit.hf.load_quantized(path, "nf4")   a 4-bit/8-bit frozen base for QLoRA (lorakit.hf.quantize)
    lorakit.hf.compare(model, "data.jsonl")  full, partial, head, LoRA, DoRA, LoRA+ measured (lorakit.hf.comparison)

Modules that need more than transformers itself (the trainer, the CLI) load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import require_extra

require_extra("transformers", "hf", "lorakit.hf")

from ..registry import register  # noqa: E402
from .conv1d import Conv1D, Conv1DHandler  # noqa: E402
from .parts import PartsConv1D, PartsLinear, restore_fused, target_fused  # noqa: E402
from .targets import default_targets, lora_config, output_heads  # noqa: E402

register(Conv1D, Conv1DHandler())

_LAZY = {
    "AdapterCheckpointCallback": "callbacks",
    "compare": "comparison",
    "prepare_for_training": "callbacks",
    "DataError": "data",
    "LoraTrainer": "trainer",
    "LoraTrainerMixin": "trainer",
    "SavePretrainedError": "saving",
    "ModelPathError": "data",
    "NonFiniteLossError": "checkpoints",
    "ResumeMismatchError": "resume",
    "TrainWarning": "options",
    "load_quantized": "quantize",
    "quantization_config": "quantize",
}

__all__ = [
    "AdapterCheckpointCallback",
    "Conv1DHandler",
    "DataError",
    "LoraTrainer",
    "LoraTrainerMixin",
    "ModelPathError",
    "NonFiniteLossError",
    "PartsConv1D",
    "PartsLinear",
    "ResumeMismatchError",
    "SavePretrainedError",
    "TrainWarning",
    "compare",
    "default_targets",
    "load_quantized",
    "lora_config",
    "output_heads",
    "prepare_for_training",
    "quantization_config",
    "restore_fused",
    "target_fused",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
