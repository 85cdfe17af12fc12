"""``model.save_pretrained()`` on a model with lorakit adapters raises instead of writing a
file that loses them.

transformers' ``save_pretrained`` writes the full ``state_dict``: the base weights plus
the LoRA tensors under lorakit's own names, which ``from_pretrained`` then drops as
unexpected keys, silently. :func:`lorakit.inject` therefore gives every transformers
model it adapts an instance-level ``save_pretrained`` that raises
:class:`SavePretrainedError` while the model holds adapters, and calls the class's own
method once none are left (after :func:`lorakit.unload` or ``merge_and_unload``).
Write the adapter with :func:`lorakit.save_adapter` (PEFT format), or train with
:class:`lorakit.hf.LoraTrainer`, whose checkpoints and ``save_model`` write it.

This module imports no other part of lorakit but the errors and the adapter list, so
:mod:`lorakit.inject` can call it without an import cycle.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..adapters import list_adapters
from ..errors import ConfigError


class SavePretrainedError(ConfigError):
    """``save_pretrained`` was called on a model that holds lorakit adapters; ``adapters`` names them."""

    def __init__(self, model: nn.Module, folder: object, adapters: list[str]) -> None:
        self.adapters = adapters
        super().__init__(
            f"{type(model).__name__}.save_pretrained({str(folder)!r}): the model holds lorakit adapter(s) "
            f"{adapters}, which from_pretrained would drop; save them with lorakit.save_adapter(model, folder, name) "
            "(PEFT format), train with lorakit.hf.LoraTrainer (its checkpoints and save_model write the adapter), "
            "or merge them first (lorakit.merge_and_unload)"
        )


class _Guard:
    """The instance-level ``save_pretrained`` of an adapted model. A plain object holding the
    model (not a bound method): it pickles and deep-copies with the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Raises:
        SavePretrainedError: the model holds adapters; nothing was written.
        """
        names = list_adapters(self.model)
        if names:
            raise SavePretrainedError(self.model, save_directory, names)
        return type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)  # type: ignore[attr-defined]


def guard_save_pretrained(model: nn.Module) -> None:
    """Install the guard on ``model`` when it is a transformers ``PreTrainedModel`` (else do nothing).

    transformers is only looked up when already imported: a model of its classes implies it is.
    """
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    if base is None or not isinstance(model, base):
        return
    # An instance attribute shadows the class's method for this model only.
    model.__dict__["save_pretrained"] = _Guard(model)
