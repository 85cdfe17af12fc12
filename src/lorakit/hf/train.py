"""``lorakit hf train``: LoRA fine-tuning of a local transformers model on a JSONL file,
run by ``transformers.Trainer`` (and so by accelerate: CUDA, bf16/fp16, DDP under torchrun).

    lorakit hf train model=PATH data=FILE.jsonl r=16 epochs=3 out=DIR [eval=FILE.jsonl] ...
    torchrun --nproc_per_node=2 -m lorakit.cli hf train ...      (DDP; gloo on CPU)
    torchrun --nproc_per_node=2 -m lorakit.cli hf train ... fsdp=True   (FSDP2: the model sharded, lorakit.hf.fsdp)

What ends up in ``out``::

    adapter/                    the latest adapter (PEFT format), replaced file by file, atomically
    checkpoints/step-000040/    adapter/ + optimizer.safetensors + optimizer.json + rng-<rank>.safetensors
                                (fsdp=True: optimizer-<rank>.safetensors, each process's shard)
                                + trainer_state.json + state.json + run.json: everything a resume needs
                                (run.json: the run's settings, see lorakit.hf.resume)
    loss.png                    training loss per step and eval loss (rewritten at each checkpoint)
    metrics.json                eval results per evaluation; labels.json (classification)

Checkpoints appear atomically (written as ``.step-...tmp`` and renamed once every process
wrote its part), the two newest are kept; only the main process writes the adapter.
``resume=True`` continues from the newest one and, on CPU, reproduces the uninterrupted run
exactly: the adapter and optimizer state are restored bitwise, the torch RNG (dropout) is
restored, and the sample order is a pure function of ``(seed, epoch)``
(:class:`lorakit.hf.run.EpochSampler`), so the remaining batches are the same ones. A resume
with settings that change the run (``r``, ``targets``, ``dora``, ``data``, ``seed``, ...) is
refused naming each change; a changed ``lr``, ``epochs``, ``max_steps``, ``warmup`` or
``schedule`` is applied with a warning (:mod:`lorakit.hf.resume`).

A NaN/Inf loss stops the run at once (:class:`NonFiniteLossError`), as do Ctrl-C and
SIGTERM; none leaves a temporary file behind, and the checkpoints already written stay intact.

The learning rate warms up linearly over ``warmup`` steps, then decays to 0 (``schedule``:
linear or cosine), a function of the step, so no scheduler state is saved. With
``loraplus_ratio`` (LoRA+, :func:`lorakit.loraplus_groups`) B factors start at
``lr * loraplus_ratio`` and follow the same schedule. No gradient clipping. Classification
trains a fresh head fully (``train_modules``); it is saved with the adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..adapters import list_adapters
from ..errors import ConfigError
from ..inject import inject
from ..io import load_adapter
from ..io_format import atomic_write
from ..loraplus import loraplus_groups
from .callbacks import prepare_for_training
from .checkpoints import NonFiniteLossError, latest_checkpoint
from .data import (
    DataError,
    Example,
    ModelPathError,
    causal_examples,
    check_labels,
    classify_examples,
    collate_causal,
    collate_classify,
    detect_task,
    encode_causal,
    label_names,
    pad_id,
    read_jsonl,
)
from .fsdp import shard
from .options import TrainOptions, check_options, fit_max_len, model_context
from .resume import check_resume, run_record
from .targets import lora_config

__all__ = ["NonFiniteLossError", "TrainOptions", "latest_checkpoint", "train"]


def _model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelPathError(f"{p}: no such model folder (give a local transformers model directory)")
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{p}: not a transformers model folder (no config.json)")
    return p


def load_config(path: Path) -> Any:
    """The transformers config of the model folder ``path`` (raises ModelPathError)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{path}: cannot load its config.json: {exc}") from None


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{path}: cannot load its tokenizer: {exc}") from None


def load_model(path: Path, task: str, labels: list[str] | None, dtype: torch.dtype | None = None) -> nn.Module:
    """The base model for ``task`` from a local folder (classification: a new head for ``labels``),
    in ``dtype`` (None: transformers' choice, the checkpoint's own dtype)."""

    cls, kw = _auto_class(task, labels)
    try:
        return cast(nn.Module, cls.from_pretrained(str(path), **kw, **({} if dtype is None else {"dtype": dtype})))
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{path}: cannot load the model: {exc}") from None


def _auto_class(task: str, labels: list[str] | None) -> tuple[Any, dict[str, Any]]:
    """The transformers auto class for ``task`` and its ``from_pretrained`` keywords (local files only;
    classification: a new head for ``labels``)."""
    import transformers

    if task != "classify":
        return transformers.AutoModelForCausalLM, {"local_files_only": True}
    assert labels is not None
    return transformers.AutoModelForSequenceClassification, {
        "local_files_only": True,
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {n: i for i, n in enumerate(labels)},
    }


def load_quantized_model(path: Path, task: str, labels: list[str] | None, o: TrainOptions, device: str) -> nn.Module:
    """The base for ``task`` with its Linear layers quantised (``o.quantize``, QLoRA), on ``device``.

    The 4-bit matmuls and the adapters compute in bf16 under ``precision=bf16``, else in fp32
    (under fp16 autocast the adapters must stay fp32 for the GradScaler).

    Raises:
        MissingExtraError: bitsandbytes is not installed.
        ModelPathError: the folder does not load.
    """
    from .quantize import load_quantized

    cls, kw = _auto_class(task, labels)
    compute = "bfloat16" if o.precision == "bf16" else "float32"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: each process on its own GPU
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        return load_quantized(path, o.quantize, compute_dtype=compute, device=device, model_class=cls, **kw)
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{path}: cannot load the model: {exc}") from None


def load_folder(path: Path) -> nn.Module:
    """The model in a local folder as the class its ``config.json`` names (``architectures[0]``, e.g.
    ``GPT2LMHeadModel``), so its head loads too; ``AutoModel`` when it names none. Local files only.

    Raises:
        ModelPathError: no ``config.json``, or transformers cannot load the folder.
    """
    import transformers

    config = load_config(_model_dir(str(path)))
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    try:
        return cast(nn.Module, cls.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ModelPathError(f"{path}: cannot load the model: {exc}") from None


@dataclass
class Data:
    task: str
    train: list[Example]
    eval: list[Example]
    labels: list[str] | None


def load_data(o: TrainOptions, tokenizer: Any) -> Data:
    """Read and check every record of ``data`` (and ``eval``) before anything is written."""
    data_path = Path(o.data)
    rows = read_jsonl(data_path)
    task = detect_task(data_path, rows) if o.task == "auto" else o.task

    def examples(path: Path, rs: list[tuple[int, dict[str, Any]]]) -> list[Example]:
        return causal_examples(path, rs, tokenizer) if task == "causal" else classify_examples(path, rs)

    train = examples(data_path, rows)
    if o.eval is not None:
        ev = examples(Path(o.eval), read_jsonl(o.eval))
    elif o.eval_fraction > 0 and len(train) >= 2:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(o.seed)).tolist()
        n_eval = max(1, round(o.eval_fraction * len(train)))
        ev = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    else:
        ev = []
    labels = None
    if task == "classify":
        labels = label_names(train)
        if len(labels) < 2:
            raise DataError(data_path, 0, f"classification needs at least 2 labels in training, found {labels}")
        check_labels(ev, labels)
    return Data(task, train, ev, labels)


class Collator:
    """Tokenized batches of :class:`Example` (``Trainer``'s ``data_collator``)."""

    def __init__(self, data: Data, tokenizer: Any, max_len: int) -> None:
        self.task, self.tok, self.max_len = data.task, tokenizer, max_len
        self.label_ids = {n: i for i, n in enumerate(data.labels or [])}
        self.pad = pad_id(tokenizer)

    def __call__(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        if self.task == "causal":
            return collate_causal([encode_causal(e, self.tok, self.max_len) for e in exs], self.pad)
        return collate_classify(exs, self.tok, self.label_ids, self.max_len)


def _accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def resolve_device(o: TrainOptions) -> str:
    """``cpu`` or ``cuda`` for ``o.device`` (``auto``: CUDA when present), checked against ``precision``.

    Raises:
        ConfigError: ``device=cuda`` without a CUDA device; ``precision=fp16`` on the CPU (no fp16
            autocast there: use bf16); ``precision=bf16`` on a GPU without bf16.
    """
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if o.device == "auto" else o.device
    if device == "cuda" and not cuda:
        raise ConfigError("hf train: device=cuda, but torch finds no CUDA device (torch.cuda.is_available() is False)")
    if o.precision == "fp16" and device == "cpu":
        raise ConfigError("hf train: precision=fp16 needs a CUDA device (device is cpu); use precision=bf16 or fp32")
    if o.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("hf train: precision=bf16, but this GPU has no bf16; use precision=fp16 or fp32")
    if o.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("hf train: report_to=tensorboard needs the tensorboard package (pip install tensorboard)")
    return device


def _arguments(o: TrainOptions, device: str, out: Path) -> Any:
    """``TrainingArguments`` for the run (this also sets up the process group under torchrun)."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=o.batch_size, per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum, learning_rate=o.lr, weight_decay=o.weight_decay,
        num_train_epochs=o.epochs, max_steps=o.max_steps or -1, lr_scheduler_type=o.schedule,
        warmup_steps=o.warmup, max_grad_norm=0.0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[] if o.report_to == "none" else [o.report_to], seed=o.seed, data_seed=o.seed,
        use_cpu=device == "cpu", bf16=o.precision == "bf16", fp16=o.precision == "fp16", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, ddp_find_unused_parameters=False,
        # gloo for CPU processes under torchrun (WORLD_SIZE); a single process must have none
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )  # fmt: skip


def train(
    o: TrainOptions, *, prepare: Callable[[nn.Module], None] | None = None, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Run ``lorakit hf train``; returns a summary dict (also written to ``out/metrics.json``).

    ``max_len`` above the model's context is clamped to it (a TrainWarning says so). Under
    ``torchrun`` every process runs this; the main one writes the files.

    ``prepare`` (for ``lorakit hf compare``'s full, partial and head-only strategies) replaces the
    LoRA injection: it gets the loaded model and sets which parameters train; the checkpoints then
    hold no adapter, so such a run cannot resume. ``callbacks``: more ``TrainerCallback`` objects.

    Raises:
        ModelPathError, DataError, ConfigError: bad input, found before ``out`` is touched.
        ResumeMismatchError: ``resume=True`` with settings that differ from the saved run's
            (:mod:`lorakit.hf.resume`), found before ``out`` is touched.
        NonFiniteLossError: the loss became NaN/Inf; the run stops before that step is
            applied or saved, the checkpoints written so far stay as they are.
        KeyboardInterrupt: passed on as it came; no temporary file or folder stays behind
            and the checkpoints written so far stay as they are.
    """
    from transformers.trainer_callback import PrinterCallback

    from .run import Examples, RunCallback, RunTrainer, State

    check_options(o)
    model_dir = _model_dir(o.model)
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"hf train: out must be a folder (new, empty, or a run to resume), got the file {out}")
    device = resolve_device(o)
    tokenizer = load_tokenizer(model_dir)
    data = load_data(o, tokenizer)
    o = fit_max_len(o, data.task, model_context(load_config(model_dir)))
    ckpt = latest_checkpoint(out) if o.resume else None
    if not o.resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"hf train: {out} exists and is not empty; pass resume=True or choose another out")
    if o.resume and ckpt is None:
        raise ConfigError(f"hf train: resume=True but {out} holds no checkpoint")
    args = _arguments(o, device, out)
    if o.fsdp and args.world_size < 2:
        raise ConfigError(
            "hf train: fsdp=True shards the model across the processes of a torchrun launch, but this run has "
            "1 process; launch it with torchrun --nproc_per_node=N (N >= 2), or leave fsdp=False"
        )
    run = run_record(o, data.task, args.world_size)
    if ckpt is not None:
        check_resume(ckpt, run)
    main = args.should_save
    torch.manual_seed(o.seed)
    # fp32 whatever the checkpoint's dtype: the adapters take the base's dtype, and they must train in fp32
    # (bf16/fp16 are autocast, Trainer's GradScaler refuses fp16 parameters)
    model = (
        load_model(model_dir, data.task, data.labels, torch.float32)
        if o.quantize == "none"
        else load_quantized_model(model_dir, data.task, data.labels, o, device)
    )
    if prepare is not None:
        if ckpt is not None:
            raise ConfigError("hf train: a run without an adapter (prepare=...) cannot resume")
        prepare(model)
    elif ckpt is None:
        inject(model, lora_config(model, o.targets, r=o.r, alpha=o.lora_alpha, dropout=o.dropout, dora=o.dora))
    else:
        load_adapter(model, ckpt / "adapter")
    if o.gradient_checkpointing:
        prepare_for_training(model)
    if o.fsdp:
        shard(model, device)  # before the optimizer is built over the parameters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if main:
        print(f"lorakit hf train: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)"
              f" on {device}, {o.precision}, {args.world_size} process(es)", flush=True)  # fmt: skip

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        if o.loraplus_ratio is None:
            return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=o.lr,
                                     weight_decay=o.weight_decay)  # fmt: skip
        return torch.optim.AdamW(loraplus_groups(m, o.lr, o.loraplus_ratio, o.weight_decay))

    st = State()
    if ckpt is not None:
        raw = json.loads((ckpt / "state.json").read_text())
        st = State(step=raw["step"], losses=raw["losses"], evals=raw["evals"])
    cb = RunCallback(st, eval_every=o.eval_every, save_every=o.save_every, stop_after=o.stop_after,
                     progress=o.progress, has_eval=bool(data.eval))  # fmt: skip
    trainer = RunTrainer(
        model=model, args=args, train_dataset=Examples(data.train),
        eval_dataset=Examples(data.eval) if data.eval else None, data_collator=Collator(data, tokenizer, o.max_len),
        compute_metrics=_accuracy if data.task == "classify" else None, callbacks=[cb, *callbacks],
        out=out, run=run, st=st, seed=o.seed, make_optimizer=make_optimizer,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.accelerator.wait_for_everyone()  # every process checked out before the main one writes to it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if data.labels is not None:
            atomic_write(out / "labels.json", json.dumps(data.labels).encode())
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=None if ckpt is None else str(ckpt))
    finally:
        cb.on_train_end(args, trainer.state, trainer.control)  # closes the bar on errors too
    summary = {
        "task": data.task,
        "steps": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "stopped_early": cb.stopped,
        "seconds": time.perf_counter() - t0,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "processes": args.world_size,
        "adapters": list_adapters(model),
        "evals": st.evals,
        "final_train_loss": st.losses[-1] if st.losses else None,
    }
    if main:
        atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
    return summary
