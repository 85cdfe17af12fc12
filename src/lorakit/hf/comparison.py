"""``lorakit hf compare`` / :func:`compare`: which way to adapt a transformers model fits this data, measured.

::

    import lorakit.hf
    result = lorakit.hf.compare("models/llama", "train.jsonl", epochs=3, base_data="old.jsonl")
    result.rows          # one dict per strategy: eval loss, trainable, bytes stored, s/epoch, memory, forgetting
    print(result.markdown)

Every strategy (:data:`~lorakit.hf.comparison_job.CATALOGUE`: ``full``, ``partial``,
``head``, ``lora-rN``, ``dora``, ``loraplus``; what each trains is in
:mod:`lorakit.hf.comparison_job`) trains on the same data with the same budget and
settings through :func:`lorakit.hf.train.train`, the trainer of ``lorakit hf train``,
each in its own process, a fork of this one (its output goes to ``logs/STRATEGY.log``).
Settings are ``hf train``'s keys, shared by every strategy, except the learning rate: the
LoRA family uses ``lr`` (hf train's default 2e-3), the plain strategies ``plain_lr``
(default 5e-5, transformers' ``Trainer`` default), as in the YOLO comparison.

The text task's metric (``task=causal``): the eval loss (nats per response token), its
perplexity and the token accuracy; classification (``{"text","label"}`` records): the
accuracy and the eval loss. ``base_data`` (causal LMs only; the base's own kind of text)
adds the loss there after adaptation: forgetting.

The run folder (``out``, default ``runs/hf-compare``) keeps each finished strategy
(:mod:`lorakit.compare.store`), so running the same comparison again runs only what is
missing; at the end it holds ``results.json``, ``results.md`` and ``results.png``
(the metric against bytes stored per task).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..compare.report import (
    BYTES,
    MEMORY,
    SPEED,
    TRAINABLE,
    Axis,
    Column,
    Comparison,
    Layout,
    cost_columns,
    epochs_text,
    fmt_bytes,
    fmt_float,
    write_report,
)
from ..compare.runner import run_job, run_missing
from ..compare.store import ResultStore
from ..config import finite_number
from ..errors import ConfigError, did_you_mean
from .comparison_job import CATALOGUE, PLAIN

JOB = "lorakit.hf.comparison_job"
PLAIN_LR = 5e-5  # transformers' TrainingArguments default learning_rate
_PER_STRATEGY = "compare sets it per strategy (strategies=lora-r4,lora-r16,dora,loraplus,...)"
# hf train keys compare sets itself, and why (model, data, out and epochs are compare's own arguments)
RESERVED = {
    "r": _PER_STRATEGY,
    "dora": _PER_STRATEGY,
    "loraplus_ratio": _PER_STRATEGY,
    "quantize": "compare trains full-precision bases (a quantised base cannot be fully fine-tuned)",
    "resume": "compare resumes by strategy: run the same comparison again",
    "stop_after": "compare resumes by strategy: run the same comparison again",
    "progress": "compare prints a line per strategy",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_files(folder: Path) -> dict[str, int]:
    """``{file: bytes}`` of the model folder: what tells one base from another in ``settings.json``."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def _check_train(train: dict[str, Any]) -> None:
    """Refuse the keys compare sets itself and unknown ones (with close matches).

    Raises:
        ConfigError: naming the key.
    """
    from .options import TrainOptions

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    for key in train:
        if key in RESERVED:
            raise ConfigError(f"compare: {key}= is not a setting of compare: {RESERVED[key]}")
        if key not in fields:
            known = (fields - set(RESERVED)) | {"base_data", "strategies", "overwrite", "plain_lr", "epochs"}
            raise ConfigError(f"compare: unknown setting {key!r}{did_you_mean(key, known)}")


def _check_model(model_dir: Path, task: str, names: list[str]) -> None:
    """``partial`` finds the model's blocks and ``head`` its head, on a weightless copy (meta device).

    Raises:
        ConfigError: it does not.
    """
    import torch
    import transformers

    from .comparison_job import blocks
    from .targets import output_heads
    from .train import load_config

    if not {"partial", "head"} & set(names):
        return
    cls = transformers.AutoModelForSequenceClassification if task == "classify" else transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = cls.from_config(load_config(model_dir))  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"model={str(model_dir)!r}: transformers cannot build it for task {task}: {exc}") from None
    if "partial" in names:
        blocks(model)
    if not output_heads(model):
        raise ConfigError(f"strategies=head: {type(model).__name__} has no output head to train")


def compare(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    epochs: int = 3,
    base_data: str | os.PathLike[str] | None = None,
    strategies: str | Sequence[str] | None = None,
    out: str | os.PathLike[str] = "runs/hf-compare",
    overwrite: bool = False,
    plain_lr: float = PLAIN_LR,
    stream: TextIO | None = None,
    **train: Any,
) -> Comparison:
    """Train each strategy on ``data`` with the same budget; measure and compare them (module docstring).

    Args:
        model: the base, a local transformers model folder.
        data: the new task's JSONL (hf train's records); ``eval=FILE`` or ``eval_fraction`` (default
            0.1 of ``data``) gives the records every strategy is measured on.
        epochs: the budget, the same for every strategy.
        base_data: JSONL of the base's own kind of text (prompt/response or messages): adds the
            eval loss there after adaptation (forgetting). Causal LMs only.
        strategies: names (a list or ``"full,lora-r8"``); default ``CATALOGUE.default``.
        out: the run folder; a comparison run there before with the same settings goes on from it.
        overwrite: discard the results kept in ``out`` first.
        plain_lr: the learning rate of ``full``, ``partial`` and ``head``.
        stream: where the progress lines go (default stdout).
        train: other ``hf train`` settings (``lr``, ``batch_size``, ``max_len``, ``device``, ...),
            for every strategy.

    Returns:
        The :class:`~lorakit.compare.report.Comparison`; ``results.json``, ``results.md`` and
        ``results.png`` are in ``out``.

    Raises:
        ConfigError: an unknown strategy (with close names), an unknown, reserved or bad setting, no
            eval records, ``base_data`` with a classification task, a folder holding another
            comparison; all before any training.
        ModelPathError: ``model`` is not a transformers model folder.
        DataError: a data file that is missing or has a bad record (file and line named).
        StrategyFailedError: a strategy's training failed (the finished ones are kept).
    """
    from .data import causal_examples, read_jsonl
    from .options import TrainOptions, check_options
    from .train import _model_dir, load_data, load_tokenizer

    names = CATALOGUE.pick(strategies)
    _check_train(train)
    if not finite_number(plain_lr) or not plain_lr > 0:
        raise ConfigError(f"compare: plain_lr must be a finite number > 0, got {plain_lr!r}")
    model_dir = _model_dir(str(model)).resolve()
    if train.get("eval") is not None:
        train["eval"] = str(Path(str(train["eval"])).resolve())
    o = TrainOptions(model=str(model_dir), data=str(Path(data).resolve()), out=str(out), epochs=epochs, **train)
    check_options(o)
    tok = load_tokenizer(model_dir)
    task = load_data(o, tok)
    if not task.eval:
        raise ConfigError("compare: no eval records (eval_fraction=0 and no eval=FILE): nothing to measure on")
    base_path = None
    if base_data is not None:
        if task.task != "causal":
            raise ConfigError(f"base_data={str(base_data)!r}: forgetting is measured for causal LMs only, data is "
                              f"a {task.task} task")  # fmt: skip
        base_path = Path(base_data).resolve()
        causal_examples(base_path, read_jsonl(base_path), tok)  # every record checked before any work
    _check_model(model_dir, task.task, names)
    settings = {
        "model": str(model_dir),
        "model_files": _model_files(model_dir),
        "data": o.data,
        "data_sha256": _sha256(Path(o.data)),
        "base_data": str(base_path) if base_path else None,
        "base_data_sha256": _sha256(base_path) if base_path else None,
        "epochs": epochs,
        "plain_lr": plain_lr,
        "train": train,
    }
    folder = Path(out).resolve()
    store = ResultStore(folder, settings, overwrite=overwrite)
    if store.get("base") is None:
        run_job(folder, "base", JOB, fork=True)  # the untrained model's numbers: the reference
    results = run_missing(store, names, JOB, _summary, stream, fork=True)
    return _report(folder, store.settings, [_row(r) for r in results], store.get("base") or {})


def _summary(r: dict[str, Any]) -> str:
    """The progress line's account of a finished strategy."""
    return (f"eval loss {r['eval_loss']:.4f}, accuracy {r['accuracy']:.3f}, {r['trainable']:,} trainable, "
            f"{fmt_bytes(r['stored_bytes'])} stored")  # fmt: skip


ROW_KEYS = (
    "strategy",
    "method",
    "eval_loss",
    "perplexity",
    "accuracy",
    "trainable",
    "total_params",
    "stored",
    "stored_bytes",
    "epoch_s",
    "train_s",
    "steps",
    "peak_mem_mib",
    "memory",
    "adapted_layers",
    "wall_s",
)
FORGETTING_KEYS = (
    "base_eval_loss_adapted",
    "base_perplexity_adapted",
    "base_accuracy_adapted",
    "base_eval_loss_off",
    "base_perplexity_off",
    "base_accuracy_off",
)


def _row(result: dict[str, Any]) -> dict[str, Any]:
    """A result as a table row: every column present (``None``: not measured for this strategy)."""
    row = {k: result.get(k) for k in (*ROW_KEYS, *FORGETTING_KEYS)}
    row["trainable_fraction"] = result["trainable"] / result["total_params"]
    return row


def _layout(settings: dict[str, Any], rows: list[dict[str, Any]], base: dict[str, Any]) -> Layout:
    from .options import TrainOptions

    causal = base["task"] == "causal"
    forgetting = settings["base_data"] is not None
    acc = "token accuracy" if causal else "accuracy"
    cols = [Column("strategy", "strategy"), Column("eval_loss", "eval loss", fmt_float(4))]
    cols += [Column("perplexity", "perplexity", fmt_float(2))] if causal else []
    cols += [Column("accuracy", acc, fmt_float(3)), *cost_columns(rows)]
    if forgetting:
        cols += [
            Column("base_eval_loss_adapted", "base eval loss, adapted", fmt_float(4)),
            Column("base_eval_loss_off", "base eval loss, adapter off", fmt_float(4)),
        ]
    loss = Axis("eval_loss", "Lowest eval loss", "min", fmt_float(4))
    accuracy = Axis("accuracy", f"Most accurate ({acc})", "max", fmt_float(3))
    axes = [
        loss,
        accuracy,
        TRAINABLE,
        BYTES,
        SPEED,
        MEMORY,
        Axis("base_eval_loss_adapted", "Least forgetting (base eval loss after adaptation)", "min", fmt_float(4)),
    ]
    t = settings["train"]
    lr = t.get("lr", next(f.default for f in dataclasses.fields(TrainOptions) if f.name == "lr"))
    n_eval = base["eval_examples"]
    metric = (
        f"Eval loss: the mean cross-entropy (nats) per response token over the {n_eval} eval records; perplexity "
        "is its exp; token accuracy the share of response tokens the argmax predicts."
        if causal
        else f"Accuracy and eval loss (cross-entropy) over the {n_eval} eval records."
    )
    notes = [
        f"{metric} The untrained base scores eval loss {base['base_model_eval_loss']:.4f}, {acc} "
        f"{base['base_model_accuracy']:.3f}. Each is measured on the model rebuilt from the base and what is stored "
        "(the LoRA family with its adapter merged).",
        "",
        "Stored per task: `full` every parameter (the whole model), `partial`/`head` the parameters they train, "
        "each fp32 safetensors; the LoRA family its adapter folder (fp32 safetensors + JSON); the base model's "
        f"weight files are {fmt_bytes(_weights_bytes(Path(settings['model'])))}. s / epoch: the training steps "
        "alone (forward, backward, optimizer), evaluation and checkpoints left out.",
    ]
    if forgetting:
        notes += [
            "",
            f"Base task (`{settings['base_data']}`): the base model's eval loss there is {base['base_eval_loss']:.4f}. "
            "'adapted' is the fine-tuned model (LoRA family: the adapter merged) on it, 'adapter off' the LoRA "
            "model with its adapter disabled, which is the base.",
        ]
    gain = loss if causal else accuracy
    ys = [("eval_loss", "eval loss on the new data (lower is better)") if causal else ("accuracy", "accuracy")]
    if forgetting:
        ys.append(("base_eval_loss_adapted", "eval loss on the base data, adapted"))
    shared = ", ".join(f"{k}={v}" for k, v in t.items())
    return Layout(
        title="lorakit hf compare",
        intro=f"Base `{settings['model']}`, data `{settings['data']}` ({'causal LM' if causal else 'classification'}), "
        f"{epochs_text(settings['epochs'])}{', ' + shared if shared else ''}; lr {lr:g} for the "
        f"LoRA family, {settings['plain_lr']:g} for full/partial/head. Every strategy with the same data, budget "
        "and settings, through hf train's trainer, each in its own process (peak memory: peak RSS on CPU, "
        "counting the libraries the process holds, or CUDA max allocated on a GPU).",
        columns=cols,
        notes=notes,
        axes=axes,
        gain=gain,
        cost=BYTES,
        ys=ys,
        plot_title=f"{Path(settings['data']).name}: {ys[0][0].replace('_', ' ')} vs bytes stored per task "
        f"({epochs_text(settings['epochs'])})",
    )


def _report(folder: Path, settings: dict[str, Any], rows: list[dict[str, Any]], base: dict[str, Any]) -> Comparison:
    return write_report(folder, settings, base, rows, _layout(settings, rows, base))


__all__ = ["CATALOGUE", "PLAIN", "Comparison", "compare"]
