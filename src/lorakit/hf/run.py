"""The ``transformers.Trainer`` that ``lorakit hf train`` runs, and what lorakit adds to it.

``Trainer`` (and accelerate under it) does the loop, the device, mixed precision,
gradient accumulation, the lr schedule and DDP. :class:`RunTrainer` keeps what is
lorakit's own (the folder layout is documented in :mod:`lorakit.hf.train`):

- checkpoints written as ``checkpoints/.step-N.tmp`` and renamed to ``step-N`` when
  complete (all processes wrote their part), the two newest kept, ``adapter/`` refreshed;
- the optimizer in safetensors + JSON (no pickle; under FSDP2 one file of its own shard per
  process, :mod:`lorakit.hf.fsdp`), and no scheduler file: the lr is a
  pure function of the step, recomputed on resume (so a changed ``lr`` applies at once);
- the torch RNG in ``rng-<rank>.safetensors`` (dropout is the only randomness in a step);
- the sample order of epoch ``e`` is ``randperm(n, seed * 1000 + e)`` (:class:`EpochSampler`),
  split into consecutive per-process batches under DDP;
- a NaN/Inf loss stops the run before its backward (:class:`NonFiniteLossError`);
- eval and checkpoint at ``eval_every``/``save_every`` steps and at each epoch end, a
  progress bar, ``loss.png`` (:class:`RunCallback`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import NonFiniteError
from ..io_format import atomic_write
from .checkpoints import KEEP_CHECKPOINTS, NonFiniteLossError, latest_checkpoint, load_optimizer, save_optimizer
from .fsdp import is_sharded
from .plot import plot_losses
from .resume import RUN_FILE
from .trainer import LoraTrainerMixin


@dataclass
class State:
    """What ``state.json`` records: the steps done, the loss of each, the evaluations."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


class EpochSampler(torch.utils.data.Sampler[int]):
    """The order of epoch ``e`` is ``randperm(n, seed * 1000 + e)``: a pure function of
    ``(seed, epoch)``, so a resumed run meets the same batches. ``Trainer`` calls
    :meth:`set_epoch` before each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class Examples(torch.utils.data.Dataset[Any]):
    """A list as a map-style dataset (the collator tokenizes)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class RunTrainer(LoraTrainerMixin, transformers.Trainer):
    """``Trainer`` with lorakit's checkpoints, sampler, optimizer and NaN stop (module docstring).

    ``run`` is the run record saved as ``run.json``; ``make_optimizer`` builds the optimizer
    from the model (AdamW, or LoRA+ groups); ``state`` holds the losses and evaluations.
    """

    def __init__(self, *a: Any, out: Path, run: dict[str, Any], st: State, seed: int,
                 make_optimizer: Any, **kw: Any) -> None:  # fmt: skip
        super().__init__(*a, **kw)
        self.out, self.run, self.st, self.sample_seed, self.make_optimizer = out, run, st, seed, make_optimizer
        self.trainable = [n for n, p in cast(nn.Module, self.model).named_parameters() if p.requires_grad]

    # -- data, optimizer, loss ------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler[int]:
        ds = self.train_dataset if train_dataset is None else train_dataset
        return EpochSampler(len(cast(Examples, ds)), self.sample_seed)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = self.make_optimizer(self.model)
        return cast(torch.optim.Optimizer, self.optimizer)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:  # fmt: skip
        """``Trainer``'s loss, refused when NaN/Inf: before its backward, so the adapter and the
        optimizer state never see it.

        Raises:
            NonFiniteLossError: naming the step and the last complete checkpoint.
        """
        res = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = cast(torch.Tensor, res[0] if return_outputs else res)
        value = float(loss.detach())
        if model.training and not math.isfinite(value):
            raise NonFiniteLossError(self.state.global_step + 1, value, latest_checkpoint(self.out))
        return res

    # -- checkpoints -----------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Nothing: :func:`lorakit.hf.train.train` loaded the checkpoint's adapter (``adapter/``)
        into the model before building the optimizer over its parameters."""

    def _shard(self) -> int | None:
        """This process's rank when the model is sharded (FSDP2: each process keeps its part of the
        optimizer state), else None (the main process saves the whole state)."""
        return self.args.process_index if is_sharded(cast(nn.Module, self.model)) else None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        shard = self._shard()
        if self.args.should_save or shard is not None:
            save_optimizer(cast(torch.optim.Optimizer, self.optimizer), Path(output_dir), self.trainable, shard=shard)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The optimizer state from ``checkpoint``; the lr of each group recomputed for its step
        from the current settings (a changed ``lr``, ``warmup`` or ``schedule`` applies from here)."""
        if checkpoint is None:
            return
        opt = cast(torch.optim.Optimizer, self.optimizer)
        load_optimizer(opt, Path(checkpoint), self.trainable, shard=self._shard())
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        sched = cast(torch.optim.lr_scheduler.LRScheduler, self.lr_scheduler)
        sched.last_epoch = step - 1  # the next step() computes the lr of ``step``
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": intended here
            sched.step()

    def _save_rng_state(self, output_dir: str) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        name = f"rng-{self.args.process_index}.safetensors"
        atomic_write(Path(output_dir) / name, safetensors.torch.save(rng, metadata={"format": "pt"}))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint) / f"rng-{self.args.process_index}.safetensors"
        if not path.is_file():
            warnings.warn(f"{path} is missing; the resumed run's dropout will differ", stacklevel=2)
            return
        rng = safetensors.torch.load(path.read_bytes())
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``checkpoints/step-N``, complete or not at all, then ``adapter/`` and ``loss.png``.

        Every process writes its RNG file into the temporary folder; the main process writes the
        rest and renames it once all are done. On any error (Ctrl-C included) the temporary folder
        is removed and the older checkpoints stay.

        Raises:
            NonFiniteLossError: the adapter holds NaN/Inf after this step's update (nothing renamed).
        """
        acc = self.accelerator
        step = self.state.global_step
        ckdir = self.out / "checkpoints"
        final, tmp = ckdir / f"step-{step:06d}", ckdir / f".step-{step:06d}.tmp"
        main = self.args.should_save
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            try:
                self._save(str(tmp / "adapter"))
            except NonFiniteError:
                # The update of this step (finite loss, non-finite result, e.g. an lr far too large)
                # broke the adapter; without a save here the next loss would show it.
                last = self.st.losses[-1] if self.st.losses else math.nan
                raise NonFiniteLossError(step, last, latest_checkpoint(self.out), adapter=True) from None
            self._save_optimizer_and_scheduler(str(tmp))
            self._save_rng_state(str(tmp))
            if main:
                self.state.save_to_json(str(tmp / "trainer_state.json"))
                atomic_write(tmp / RUN_FILE, json.dumps(self.run, indent=1).encode())
                atomic_write(tmp / "state.json", json.dumps(asdict(self.st)).encode())
            acc.wait_for_everyone()
            if main:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)  # the checkpoint appears complete or not at all
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if main:
            for old in sorted(p for p in ckdir.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
                # state.json first: a removal cut short (Ctrl-C) leaves a folder resume ignores
                (old / "state.json").unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)
        self._save(str(self.out / "adapter"))  # every process: a sharded model's tensors are gathered
        if main:
            plot_losses(self.out, self.st.losses, self.st.evals)
        acc.wait_for_everyone()


class RunCallback(TrainerCallback):
    """When to evaluate and save (``eval_every``/``save_every`` steps, each epoch's end, the
    last step, ``stop_after``), the losses and evaluations of :class:`State`, and the progress
    bar (main process only)."""

    def __init__(self, st: State, *, eval_every: int, save_every: int, stop_after: int, progress: bool,
                 has_eval: bool) -> None:  # fmt: skip
        self.st, self.eval_every, self.save_every, self.stop_after = st, eval_every, save_every, stop_after
        self.progress, self.has_eval = progress, has_eval
        self.run_steps = 0
        self.stopped = False
        self.last_eval = self.last_save = -1
        self.bar: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kw: Any) -> None:  # fmt: skip
        if self.progress and state.is_world_process_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def _flags(self, state: TrainerState, control: TrainerControl, epoch_end: bool) -> None:
        step = state.global_step
        last = step >= state.max_steps
        if (
            self.has_eval
            and self.last_eval != step
            and (epoch_end or last or (self.eval_every and step % self.eval_every == 0))
        ):
            control.should_evaluate, self.last_eval = True, step
        if self.last_save != step and (
            epoch_end or last or self.stopped or (self.save_every and step % self.save_every == 0)
        ):
            control.should_save, self.last_save = True, step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kw: Any) -> None:  # fmt: skip
        self.run_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.stop_after and self.run_steps >= self.stop_after and state.global_step < state.max_steps:
            self.stopped = True
            control.should_training_stop = True
        self._flags(state, control, epoch_end=False)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kw: Any) -> None:  # fmt: skip
        if not self.stopped:  # stop_after ends the epoch early: not an epoch end
            self._flags(state, control, epoch_end=True)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: Any) -> None:  # fmt: skip
        # logging_steps=1: "loss" is this step's loss, averaged over the processes
        if logs and "loss" in logs and len(self.st.losses) < state.global_step:
            self.st.losses.append(float(logs["loss"]))
            self.st.step = state.global_step
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.st.losses[-1]:.4f}")

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kw: Any) -> None:  # fmt: skip
        res = {k: float(v) for k, v in (metrics or {}).items() if k in ("eval_loss", "eval_accuracy")}
        if res:
            self.st.evals.append({"step": state.global_step, "epoch": float(state.epoch or 0.0), **res})
            if self.bar is not None:
                self.bar.write(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kw: Any) -> None:  # fmt: skip
        if self.bar is not None:
            self.bar.close()
            self.bar = None
