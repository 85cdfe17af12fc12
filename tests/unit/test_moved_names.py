"""Names that moved to their own home stay importable from where they were.

Users and pickles name them by their old module: a pickled LoRA layer is rebuilt by
``lorakit.layers._restore``, a frozen BatchNorm carries ``lorakit.inject._keep_eval``.
"""

from __future__ import annotations

import importlib

import pytest

MOVED = [
    # (old module, name, new module)
    ("lorakit.layers", "LoraLayer", "lorakit.layer_base"),
    ("lorakit.layers", "LoraAdapter", "lorakit.layer_base"),
    ("lorakit.layers", "wrap", "lorakit.layer_base"),
    ("lorakit.layers", "unwrap", "lorakit.layer_base"),
    ("lorakit.layers", "adapter_dict", "lorakit.layer_base"),
    ("lorakit.layers", "lora_class_for", "lorakit.layer_base"),
    ("lorakit.layers", "_restore", "lorakit.layer_base"),
    ("lorakit.registry", "LayerHandler", "lorakit.layer_base"),
    ("lorakit.registry", "register", "lorakit.layer_base"),
    ("lorakit.registry", "handler_for", "lorakit.layer_base"),
    ("lorakit.registry", "registered_types", "lorakit.layer_base"),
    ("lorakit.registry", "LAZY", "lorakit.layer_base"),
    ("lorakit.inject", "lora_layers", "lorakit.state"),
    ("lorakit.inject", "freeze_batchnorm", "lorakit.batchnorm"),
    ("lorakit.inject", "release_batchnorm", "lorakit.batchnorm"),
    ("lorakit.inject", "_keep_eval", "lorakit.batchnorm"),
    ("lorakit.mixed", "MixedPlan", "lorakit.mixed_kernels"),
    ("lorakit.mixed", "linear_mixed", "lorakit.mixed_kernels"),
    ("lorakit.mixed", "conv_mixed", "lorakit.mixed_kernels"),
    ("lorakit.mixed", "embedding_mixed", "lorakit.mixed_kernels"),
    # issue 14: lorakit.layers became a package, one module per layer type
    ("lorakit.layer_base", "LoraLayer", "lorakit.layers.base"),
    ("lorakit.layer_base", "LoraAdapter", "lorakit.layers.base"),
    ("lorakit.layer_base", "LayerHandler", "lorakit.layers.base"),
    ("lorakit.layer_base", "register", "lorakit.layers.base"),
    ("lorakit.layer_base", "handler_for", "lorakit.layers.base"),
    ("lorakit.layer_base", "wrap", "lorakit.layers.base"),
    ("lorakit.layer_base", "unwrap", "lorakit.layers.base"),
    ("lorakit.layer_base", "_restore", "lorakit.layers.base"),
    ("lorakit.layer_base", "STRUCTURE", "lorakit.layers.base"),
    ("lorakit.layer_base", "CONV_FORM_ATTR", "lorakit.layers.conv"),
    ("lorakit.layers", "_restore", "lorakit.layers.base"),
    ("lorakit.layers", "LinearHandler", "lorakit.layers.linear"),
    ("lorakit.layers", "ConvHandler", "lorakit.layers.conv"),
    ("lorakit.layers", "EmbeddingHandler", "lorakit.layers.embedding"),
    ("lorakit.layers", "CONV_FORM_ATTR", "lorakit.layers.conv"),
    ("lorakit.registry", "LayerHandler", "lorakit.layers.base"),
    ("lorakit.fused", "LoraLinearFn", "lorakit.layers.fused_linear"),
    ("lorakit.fused", "new_seed", "lorakit.layers.fused_linear"),
    ("lorakit.fused", "dropped_positions", "lorakit.layers.fused_linear"),
    ("lorakit.mixed_kernels", "MixedPlan", "lorakit.layers.mixed_plan"),
    ("lorakit.mixed_kernels", "linear_mixed", "lorakit.layers.linear"),
    ("lorakit.mixed_kernels", "conv_mixed", "lorakit.layers.conv"),
    ("lorakit.mixed_kernels", "embedding_mixed", "lorakit.layers.embedding"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_a_moved_name_is_the_same_object_at_its_old_path(old: str, name: str, new: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)
