"""lorakit inside ``transformers.Trainer``: adapter files at every checkpoint, and
gradient checkpointing that reaches the adapters.

A model with lorakit adapters is still the same ``PreTrainedModel`` (LoRA layers keep
their class identity and base parameter names), so ``Trainer`` trains, evaluates,
checkpoints and resumes it unchanged: its checkpoints hold the full ``state_dict``,
adapters included, and the optimizer only sees parameters with ``requires_grad``.
:class:`AdapterCheckpointCallback` adds the small PEFT-compatible adapter folder next to
each checkpoint::

    trainer = Trainer(model=model, args=args, ..., callbacks=[AdapterCheckpointCallback()])
    # -> out/checkpoint-500/adapter/{adapter_config.json, adapter_model.safetensors}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapters import list_adapters
from ..io import save_adapter


class AdapterCheckpointCallback(TrainerCallback):
    """On every Trainer save, write ``<checkpoint>/<subdir>/`` with :func:`lorakit.save_adapter`
    for each adapter in ``names`` (default: every adapter; adapters other than the first go
    to ``<subdir>/<name>``, as PEFT lays them out). Files are written atomically."""

    def __init__(self, names: list[str] | None = None, subdir: str = "adapter") -> None:
        self.names = names
        self.subdir = subdir

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if model is None or not state.is_world_process_zero:
            return control
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}" / self.subdir
        names = self.names if self.names is not None else list_adapters(model)
        for i, name in enumerate(names):
            save_adapter(model, folder if i == 0 else folder / name, name)
        return control


def prepare_for_training(model: nn.Module, *, gradient_checkpointing: bool = True, reentrant: bool = False) -> None:
    """Turn on gradient checkpointing so that gradients still reach the adapters.

    With the frozen embeddings, the hidden states entering each checkpointed block do
    not require grad. Non-reentrant checkpointing (the default here and in transformers
    5) still back-propagates into the adapters inside; the reentrant variant would not,
    so with ``reentrant=True`` the input embeddings' output is made to require grad
    (``model.enable_input_require_grads()``), as PEFT does.
    """
    if not gradient_checkpointing:
        return
    kwargs = {"use_reentrant": reentrant}
    # transformers 5.x renamed it; gradient_checkpointing_enable is a deprecated alias there.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise TypeError(f"{type(model).__name__} cannot checkpoint activations; is it a transformers model?")
        enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()  # type: ignore[operator]
    model.config.use_cache = False  # type: ignore[union-attr]
