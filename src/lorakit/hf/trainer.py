"""``transformers.Trainer`` whose checkpoints hold the adapter, not the base model.

    trainer = lorakit.hf.LoraTrainer(model=model, args=args, train_dataset=..., ...)
    trainer.train()                                   # checkpoint-N/: adapter + optimizer + scheduler + RNG + state
    trainer.train(resume_from_checkpoint=True)       # loads the adapter back, in place
    trainer.save_model("out")                        # out/adapter_model.safetensors + adapter_config.json

A plain ``Trainer`` saves a model by ``model.save_pretrained``: the full ``state_dict``,
base weights included (a 7B model: ~14 GB per checkpoint), under names ``from_pretrained``
drops (:mod:`lorakit.hf.saving` makes that call raise on an adapted model).
:class:`LoraTrainerMixin` replaces the two places ``Trainer`` touches model weights:

- ``_save`` (``save_model`` and every checkpoint) writes each adapter in PEFT's format with
  :func:`lorakit.save_adapter` (atomic per folder): the first adapter in the folder itself,
  the others in ``<folder>/<name>/``, as PEFT lays them out; plus the tokenizer
  (``processing_class``), as ``Trainer`` does. No ``training_args.bin``: it is a pickle, and
  nothing reads it back.
- ``_load_from_checkpoint`` / ``_load_best_model`` copy the saved adapter weights into the
  model's adapters in place (:func:`lorakit.hotswap_adapter`): the Parameter objects stay
  the ones the optimizer holds, so its saved state applies to them.

The optimizer, scheduler, scaler, RNG and ``trainer_state.json`` files are ``Trainer``'s own.
Mix it into another ``Trainer`` subclass (e.g. TRL's) as ``class T(LoraTrainerMixin, SFTTrainer)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import transformers
from torch import nn

from ..adapters import list_adapters
from ..hotswap import hotswap_adapter
from .callbacks import adapter_folders, save_adapters
from .fsdp import is_sharded


def _unwrapped(trainer: Any, model: nn.Module | None) -> nn.Module:
    m = trainer.model if model is None else model
    return cast(nn.Module, trainer.accelerator.unwrap_model(m, keep_torch_compile=False))


class LoraTrainerMixin:
    """Adapter-only ``save_model`` and checkpoints, adapter-only resume (module docstring).
    Put it before the ``Trainer`` class in the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model: Any = kwargs.get("model", args[0] if args else None)
        # Trainer refuses a quantised model (BitsAndBytesConfig) unless PEFT adapters are on it: it checks
        # transformers' flag for PEFT-loaded adapters, once, here. lorakit's adapters count as such, so
        # the flag is raised for that check only (transformers reads it elsewhere to call PEFT's code).
        quantised = model is not None and bool(getattr(model, "is_quantized", False))
        if quantised and list_adapters(model) and not getattr(model, "_hf_peft_config_loaded", False):
            model._hf_peft_config_loaded = True  # type: ignore[union-attr]
            try:
                super().__init__(*args, **kwargs)
            finally:
                model._hf_peft_config_loaded = False  # type: ignore[union-attr]
        else:
            super().__init__(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Write the adapters (and the tokenizer) to ``output_dir``; the main process writes.

        ``state_dict`` (given by ``Trainer`` under DeepSpeed or FSDP's full state dict) is not
        used: the adapters are read from the model itself. A model sharded by FSDP2
        (:mod:`lorakit.hf.fsdp`) is read by every process (the tensors are gathered, a collective),
        so every process must call this; the main one writes.

        Raises:
            NonFiniteError: an adapter holds NaN/Inf (from :func:`lorakit.save_adapter`).
        """
        t = cast(Any, self)
        model = _unwrapped(t, None)
        sharded = is_sharded(model)
        if not t.args.should_save and not sharded:
            return
        folder = Path(output_dir if output_dir is not None else t.args.output_dir)
        save_adapters(model, folder, write=t.args.should_save)
        if not t.args.should_save:
            return
        if t.processing_class is not None:
            t.processing_class.save_pretrained(str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Copy the adapters saved in ``resume_from_checkpoint`` into the model's, in place.

        Raises:
            AdapterFileError (lorakit.io_errors): a folder lacks an adapter's files, or they do
                not fit the model's adapter (other targets, shapes or base model).
        """
        load_adapters_into(_unwrapped(self, model), Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        t = cast(Any, self)
        load_adapters_into(_unwrapped(t, None), Path(t.state.best_model_checkpoint))


class LoraTrainer(LoraTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with adapter-only checkpoints (module docstring)."""


def load_adapters_into(model: nn.Module, folder: Path) -> None:
    """Copy each adapter saved in ``folder`` (laid out as :func:`save_adapters` writes it) into
    ``model``'s adapter of the same name, in place.

    Raises:
        AdapterFileError (lorakit.io_errors): a folder lacks an adapter's files, or they do not
            fit the model's adapter.
    """
    for name, sub in adapter_folders(list_adapters(model), folder):
        hotswap_adapter(model, sub, name)


__all__ = ["LoraTrainer", "LoraTrainerMixin", "load_adapters_into"]
