"""lorakit inside ``transformers.Trainer``: adapter folders at checkpoints, and gradient
checkpointing that reaches the adapters.

Train an adapted model with :class:`lorakit.hf.LoraTrainer` (:mod:`lorakit.hf.trainer`):
its checkpoints and ``save_model`` hold the adapter in PEFT's format, not the base
weights. A plain ``Trainer`` cannot save an adapted model: ``model.save_pretrained``
raises (:mod:`lorakit.hf.saving`) rather than write a file ``from_pretrained`` would
load without the adapter. :class:`AdapterCheckpointCallback` adds a copy of the adapter
in a subfolder of each checkpoint, for tools that look for one there::

    trainer = LoraTrainer(model=model, args=args, ..., callbacks=[AdapterCheckpointCallback()])
    # -> out/checkpoint-500/adapter/{adapter_config.json, adapter_model.safetensors}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapters import list_adapters
from ..io import encode_adapter, save_adapter


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
        save_adapters(model, folder, self.names)
        return control


def adapter_folders(names: list[str], folder: Path) -> list[tuple[str, Path]]:
    """Where each of ``names`` goes under ``folder``: the first in it, the others in ``folder/<name>``
    (PEFT's layout for several adapters)."""
    return [(name, folder if i == 0 else folder / name) for i, name in enumerate(names)]


def save_adapters(model: nn.Module, folder: Path, names: list[str] | None = None, *, write: bool = True) -> None:
    """:func:`lorakit.save_adapter` for each of ``names`` (default: every adapter), laid out by
    :func:`adapter_folders`.

    ``write=False``: read the adapters as the save would, without writing: the part of the
    processes that do not write when the model is sharded (FSDP2), whose reads are collectives
    every process must join (:func:`lorakit.io.encode_adapter`).

    Raises:
        NonFiniteError: an adapter holds NaN/Inf.
    """
    for name, sub in adapter_folders(list_adapters(model) if names is None else names, folder):
        if write:
            save_adapter(model, sub, name)
        else:
            encode_adapter(model, sub, name)


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
