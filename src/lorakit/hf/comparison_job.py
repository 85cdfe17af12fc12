"""One strategy of ``lorakit hf compare``, trained and measured in its own process.

``python -m lorakit.hf.comparison_job FOLDER STRATEGY`` (or :func:`main`, which the
comparison calls in a fork of itself) reads the comparison's ``FOLDER/settings.json``
(:mod:`lorakit.compare.store`), trains ``STRATEGY`` with :func:`lorakit.hf.train.train`,
the trainer ``lorakit hf train`` runs, and keeps its result as ``FOLDER/results/STRATEGY.json``.
The pseudo-strategy ``base`` trains nothing: it measures the base model (the reference for
forgetting).

What the plain strategies train (:func:`plain_trainable`), for a causal LM and for an
encoder classifier alike; the *blocks* are the model's largest ``nn.ModuleList`` (LLaMA's
``model.layers``, GPT-2's ``transformer.h``, BERT's ``bert.encoder.layer``), the *head*
the output head(s) of :func:`lorakit.hf.output_heads` (a causal LM's ``lm_head``, a
classifier's ``classifier``/``score``):

- ``full``: every parameter;
- ``partial``: the embeddings and the first ``L // 2`` of the ``L`` blocks frozen; the later
  blocks, everything after them (the final norm; BERT's pooler) and the head trained;
- ``head``: the head alone.

Tied embeddings (GPT-2, many small LLaMA-family models): the head's weight *is* the input
embedding matrix, so ``partial`` and ``head`` train that matrix, and the input embeddings
change with it. It is one parameter: counted once and stored once (the method column says
"tied"). Untying it would train a head the base never had.

What each strategy stores per task (``stored``): the plain strategies the parameters they
trained (``full``: all of them, the whole model), fp32 safetensors; the LoRA family the adapter
folder ``lorakit hf train`` writes (fp32 safetensors + JSON; a classifier's head is in it). The
run's checkpoints are deleted once it ends (a strategy cut short runs again from its start).
Every accuracy is measured on the model rebuilt from the base and what is stored, so the bytes
stored are shown to be enough: the LoRA family with its adapter merged (the model a user
deploys) and, on ``base_data``, also with the adapter off.

The text task's metric: causal LM, the mean loss (nats per token) over the eval records'
response tokens, its perplexity, and the token accuracy (the argmax predicts the next
response token); classification, the accuracy and loss over the eval records.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..compare.store import ResultStore
from ..compare.strategies import Catalogue
from ..errors import ConfigError

LORA_R = 16  # the rank of dora and loraplus: hf train's default, so they differ from lora-r16 in one thing only
LORAPLUS_RATIO = 16.0  # the LoRA+ paper's choice
CATALOGUE = Catalogue(
    fixed={
        "full": "full fine-tuning",
        "partial": "embeddings and the first half of the blocks frozen",
        "head": "head only",
        "dora": f"DoRA, r={LORA_R} (hf train's targets)",
        "loraplus": f"LoRA+, r={LORA_R}, B factors at {LORAPLUS_RATIO:g}x the lr",
    },
    families={"lora-r": "LoRA, r={r} (hf train's targets)"},
    default=("full", "partial", "head", "lora-r4", "lora-r8", "lora-r16", "dora", "loraplus"),
)
PLAIN = ("full", "partial", "head")


def blocks(model: nn.Module) -> tuple[str, int]:
    """``(path, L)`` of the model's repeated blocks: its ``nn.ModuleList`` with the most parameters.

    Raises:
        ConfigError: the model has none.
    """
    lists = [(sum(p.numel() for p in m.parameters()), n, len(m)) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)]  # fmt: skip
    if not lists:
        raise ConfigError(
            f"strategies=partial: {type(model).__name__} has no nn.ModuleList of blocks, so its first half is unknown"
        )
    _, path, n = max(lists)
    return path, n


def tied_head(model: nn.Module) -> bool:
    """Whether the output head's weight is the input embedding matrix (one parameter)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return False
    emb, head = get_in(), get_out()
    return emb is not None and head is not None and head.weight is emb.weight


def plain_trainable(model: nn.Module, strategy: str) -> list[str]:
    """Set ``requires_grad`` for plain ``strategy`` (module docstring); return the trained parameters'
    names (a tied parameter under its first name, as ``named_parameters`` gives it).

    Raises:
        ConfigError: ``partial`` on a model without blocks; ``head``/``partial`` on one without a head.
    """
    from .targets import output_heads

    names = [n for n, _ in model.named_parameters()]
    if strategy == "full":
        train = set(names)
    else:
        heads = output_heads(model)
        head = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        if not head:
            raise ConfigError(f"strategies={strategy}: {type(model).__name__} has no output head to train")
        train = {n for n, p in model.named_parameters() if id(p) in head}
        if strategy == "partial":
            path, n_blocks = blocks(model)
            first = f"{path}.{n_blocks // 2}."
            start = next(i for i, n in enumerate(names) if n.startswith(first))
            train |= set(names[start:])
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    return [n for n in names if n in train]


def describe(model: nn.Module, strategy: str) -> str:
    """The method column of ``strategy`` on this model: what it trains, in its own names."""
    method = CATALOGUE.describe(strategy)
    if strategy not in ("partial", "head"):
        return method
    from .targets import output_heads

    heads = ", ".join(output_heads(model))
    if strategy == "partial":
        path, n = blocks(model)
        trained = f"{path}[{n // 2}:] ({n - n // 2} of {n} blocks), what follows them and the head ({heads})"
        method = f"{method}: {trained} trained"
    else:
        method = f"{method} ({heads})"
    return method + (", tied to the input embeddings (they train with it)" if tied_head(model) else "")


class StepTimer(TrainerCallback):
    """The seconds of the training steps (forward, backward, optimizer; not evaluation, checkpoints
    or data loading), and the epochs they covered."""

    def __init__(self) -> None:
        self.seconds, self.epochs, self._t = 0.0, 0.0, 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.synchronize()  # the step's kernels, not their launch

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kw: Any) -> None:  # fmt: skip
        self._sync()
        self._t = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kw: Any) -> None:  # fmt: skip
        self._sync()
        self.seconds += time.perf_counter() - self._t

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kw: Any) -> None:  # fmt: skip
        self.epochs = float(state.epoch or 0.0)


def options(settings: dict[str, Any], strategy: str, out: Path) -> Any:
    """The :class:`~lorakit.hf.train.TrainOptions` of ``strategy``: the shared settings, its own
    LoRA settings (the LoRA family) or ``plain_lr`` (the plain strategies)."""
    from .options import TrainOptions

    kw: dict[str, Any] = {**settings["train"], "model": settings["model"], "data": settings["data"]}
    kw.update(out=str(out), epochs=settings["epochs"], progress=False)
    family = CATALOGUE.rank(strategy)
    if strategy in PLAIN or strategy == "base":
        kw["lr"] = settings["plain_lr"]
    elif family is not None:
        kw["r"] = family[1]
    elif strategy == "dora":
        kw.update(r=LORA_R, dora=True)
    elif strategy == "loraplus":
        kw.update(r=LORA_R, loraplus_ratio=LORAPLUS_RATIO)
    return TrainOptions(**kw)


def evaluate(model: nn.Module, examples: Sequence[Any], collate: Any, batch_size: int, task: str,
             device: str) -> dict[str, float]:  # fmt: skip
    """The text task's metric over ``examples`` (module docstring): ``eval_loss``, ``accuracy`` and,
    for a causal LM, ``perplexity``. Sums over every token (record), not a mean of batch means."""
    import torch.nn.functional as F

    was = model.training
    model.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(examples[i : i + batch_size])).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "causal":  # the logits at position t predict the token at t + 1
                logits, labels = logits[:, :-1], labels[:, 1:]
            keep = labels != -100
            logits, labels = logits[keep], labels[keep]
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.numel()
    model.train(was)
    if not count:
        raise ConfigError("compare: the evaluation records hold no token to predict")
    out = {"eval_loss": loss / count, "accuracy": correct / count}
    if task == "causal":
        out["perplexity"] = math.exp(min(out["eval_loss"], 700.0))  # exp(>709) overflows a float
    return out


class _Task:
    """The eval data of the comparison (the new task's, and ``base_data``'s), the device and the
    model loader, as the run of ``o`` sees them."""

    def __init__(self, settings: dict[str, Any], o: Any) -> None:
        from .data import Example, causal_examples, read_jsonl
        from .options import fit_max_len, model_context
        from .train import Collator, Data, _model_dir, load_config, load_data, load_tokenizer, resolve_device

        self.dir = _model_dir(o.model)
        self.tok = load_tokenizer(self.dir)
        self.data = load_data(o, self.tok)
        self.o = fit_max_len(o, self.data.task, model_context(load_config(self.dir)))
        self.device = resolve_device(o)
        self.collate = Collator(self.data, self.tok, self.o.max_len)
        self.base_eval: list[Example] = []
        if settings.get("base_data"):
            path = Path(settings["base_data"])
            self.base_eval = causal_examples(path, read_jsonl(path), self.tok)
            self.base_collate = Collator(Data("causal", [], self.base_eval, None), self.tok, self.o.max_len)

    def load(self) -> nn.Module:
        """The base model in fp32 on the device, as train loads it (a classifier: the new head, seeded)."""
        from .train import load_model

        torch.manual_seed(self.o.seed)
        return load_model(self.dir, self.data.task, self.data.labels, torch.float32).to(self.device)

    def new(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.data.eval, self.collate, self.o.batch_size, self.data.task, self.device)

    def old(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.base_eval, self.base_collate, self.o.batch_size, "causal", self.device)


def run_base(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The base model, untrained: its metric on the new task and, with ``base_data``, on the base task."""
    task = _Task(settings, options(settings, "base", folder / "train" / "base"))
    model = task.load()
    result: dict[str, Any] = {"task": task.data.task, "eval_examples": len(task.data.eval)}
    result.update({f"base_model_{k}": v for k, v in task.new(model).items()})
    result["total_params"] = sum(p.numel() for p in model.parameters())
    if task.base_eval:
        result.update({f"base_{k}": v for k, v in task.old(model).items()})
    return result


def _store_trained(model: nn.Module, path: Path) -> Path:
    """The parameters that trained (a tied one once), fp32 safetensors, atomically."""
    from ..io_format import atomic_write, safetensors_bytes

    kept = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, safetensors_bytes(kept))
    return path


def _load_trained(model: nn.Module, path: Path) -> None:
    """Copy what :func:`_store_trained` kept into the base ``model``."""
    import safetensors.torch

    state = safetensors.torch.load(path.read_bytes())
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"{path}: tensors the model does not have: {unexpected[:5]}")


def run_strategy(folder: Path, settings: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Train ``strategy`` on ``settings``' data and budget; measure it (module docstring)."""
    from .. import disabled, load_adapter, merge_and_unload
    from ..compare.measure import peak_memory, size
    from ..layers import LoraLayer
    from .train import train

    t_start = time.perf_counter()
    out, stored = folder / "train" / strategy, folder / "stored" / f"{strategy}.safetensors"
    # An interrupted earlier try of this strategy left files but no result: start from nothing.
    shutil.rmtree(out, ignore_errors=True)
    stored.unlink(missing_ok=True)
    o = options(settings, strategy, out)
    timer = StepTimer()
    trained: list[nn.Module] = []
    method = CATALOGUE.describe(strategy)

    def prepare(model: nn.Module) -> None:
        nonlocal method
        plain_trainable(model, strategy)
        method = describe(model, strategy)
        trained.append(model)

    t0 = time.perf_counter()
    summary = train(o, prepare=prepare if strategy in PLAIN else None, callbacks=[timer])
    train_s = time.perf_counter() - t0
    if strategy in PLAIN:
        _store_trained(trained[0], stored)
        trained.clear()  # the trained model's memory is free for the evaluation's
    else:
        stored = out / "adapter"
    # The run's resume checkpoints (full: the optimizer state of every parameter, twice the model) serve
    # nothing here: a strategy cut short runs again from the start.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    task = _Task(settings, o)
    model = task.load()
    result: dict[str, Any] = {"strategy": strategy, "method": method}
    result["total_params"] = sum(p.numel() for p in model.parameters())  # the base's: every row's same total
    if strategy in PLAIN:
        _load_trained(model, stored)
        if task.base_eval:
            result.update({f"base_{k}_adapted": v for k, v in task.old(model).items()})
    else:
        load_adapter(model, stored)
        result["adapted_layers"] = sum(isinstance(m, LoraLayer) for m in model.modules())
        if task.base_eval:
            with disabled(model):
                result.update({f"base_{k}_off": v for k, v in task.old(model).items()})
        merge_and_unload(model)
        if task.base_eval:
            result.update({f"base_{k}_adapted": v for k, v in task.old(model).items()})
    result.update(task.new(model))
    memory, memory_kind = peak_memory(torch.device(task.device))
    result.update({
        "trainable": summary["trainable_parameters"],
        "stored": str(stored.relative_to(folder)),
        "stored_bytes": size(stored),
        "epoch_s": timer.seconds / timer.epochs if timer.epochs else None,
        "train_s": train_s,
        "steps": summary["steps"],
        "peak_mem_mib": memory,
        "memory": memory_kind,
        "wall_s": time.perf_counter() - t_start,
    })  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.hf.comparison_job FOLDER STRATEGY``: run one job, keep its result."""
    folder_arg, strategy = argv if argv is not None else sys.argv[1:]
    folder = Path(folder_arg)
    settings: dict[str, Any] = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    job = run_base(folder, settings) if strategy == "base" else run_strategy(folder, settings, strategy)
    ResultStore(folder, settings).put(strategy, job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
