"""``lorakit hf train``: LoRA fine-tuning of a local transformers model on a JSONL file.

    lorakit hf train model=PATH data=FILE.jsonl r=16 epochs=3 out=DIR [eval=FILE.jsonl] ...

What ends up in ``out``::

    adapter/                    the latest adapter (PEFT format), replaced file by file, atomically
    checkpoints/step-000040/    adapter/ + optimizer.safetensors + state.json + run.json: everything
                                a resume needs (run.json: the run's settings, see lorakit.hf.resume)
    loss.png                    training loss per step and eval loss (rewritten at each checkpoint)
    metrics.json                eval results per evaluation; labels.json (classification)

Checkpoints appear atomically (written as ``.step-...tmp`` and renamed), the two newest
are kept. ``resume=True`` continues from the newest one and, on CPU, reproduces the
uninterrupted run exactly: the adapter and optimizer state are restored bitwise, the
torch RNG (dropout) is restored, and the sample order is a pure function of
``(seed, epoch)``, so the remaining batches are the same ones. A resume with settings
that change the run (``r``, ``data``, ``seed``, ...) is refused; a changed ``lr`` or
``epochs`` is applied with a warning (:mod:`lorakit.hf.resume`).

A NaN/Inf loss stops the run at once (:class:`NonFiniteLossError`), as does Ctrl-C; neither
leaves a temporary file behind, and the checkpoints already written stay intact.

The learning rate decays linearly from ``lr`` to 0 over the run (a function of the step,
so there is no scheduler state to save). With ``loraplus_ratio`` (LoRA+,
:func:`lorakit.loraplus_groups`) B factors start at ``lr * loraplus_ratio`` and decay alike.
Classification trains a fresh head fully (``train_modules``); it is saved with the adapter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from torch import nn

from ..adapters import list_adapters
from ..errors import ConfigError, NonFiniteError
from ..inject import inject
from ..io import load_adapter, save_adapter
from ..io_format import atomic_write
from ..loraplus import loraplus_groups
from .callbacks import prepare_for_training
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
from .options import TrainOptions, check_options, fit_max_len, model_context
from .resume import RUN_FILE, check_resume, run_record
from .targets import lora_config

KEEP_CHECKPOINTS = 2


@dataclass
class State:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or Inf at ``step`` (``adapter``: the loss was finite, but
    the adapter held NaN/Inf after that step's update, found when saving it).

    The run stops before that step reaches the disk: ``checkpoint`` is the last good
    checkpoint (None when none was written yet).
    """

    def __init__(self, step: int, loss: float, checkpoint: Path | None, adapter: bool = False) -> None:
        self.step, self.loss, self.checkpoint, self.adapter = step, loss, checkpoint, adapter
        what = (
            f"the adapter holds NaN/Inf after the update of step {step} (loss {loss})"
            if adapter
            else f"the training loss at step {step} is {loss}"
        )
        where = (
            f"the last good checkpoint is {checkpoint} (resume=True continues from it; a lower lr may help)"
            if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(f"hf train: {what}; stopped: {where}")


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


def load_model(path: Path, task: str, labels: list[str] | None) -> nn.Module:
    """The base model for ``task`` from a local folder (classification: a new head for ``labels``)."""
    import transformers

    try:
        if task == "classify":
            assert labels is not None
            return cast(
                nn.Module,
                transformers.AutoModelForSequenceClassification.from_pretrained(
                    str(path),
                    local_files_only=True,
                    num_labels=len(labels),
                    id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)},
                ),  # fmt: skip
            )
        return cast(nn.Module, transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True))
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


class Batcher:
    """Tokenized batches; the order of epoch ``e`` is ``randperm(n, seed * 1000 + e)``."""

    def __init__(self, data: Data, tokenizer: Any, o: TrainOptions) -> None:
        self.data, self.tok, self.o = data, tokenizer, o
        self.label_ids = {n: i for i, n in enumerate(data.labels or [])}
        self.pad = pad_id(tokenizer)

    def collate(self, exs: list[Example]) -> dict[str, torch.Tensor]:
        if self.data.task == "causal":
            return collate_causal([encode_causal(e, self.tok, self.o.max_len) for e in exs], self.pad)
        return collate_classify(exs, self.tok, self.label_ids, self.o.max_len)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.o.batch_size)

    def epoch(self, e: int) -> list[list[Example]]:
        order = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(self.o.seed * 1000 + e))
        bs = self.o.batch_size
        return [[self.data.train[i] for i in order[k : k + bs].tolist()] for k in range(0, len(order), bs)]


def evaluate(model: nn.Module, batcher: Batcher) -> dict[str, float]:
    """Mean loss (per example) and, for classification, accuracy on the eval examples."""
    exs = batcher.data.eval
    if not exs:
        return {}
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for k in range(0, len(exs), batcher.o.batch_size):
            chunk = exs[k : k + batcher.o.batch_size]
            b = batcher.collate(chunk)
            out = model(**b)
            total += float(out.loss) * len(chunk)
            n += len(chunk)
            if batcher.data.task == "classify":
                correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    model.train()
    res = {"eval_loss": total / n}
    if batcher.data.task == "classify":
        res["eval_accuracy"] = correct / n
    return res


# -- checkpoints ---------------------------------------------------------------------------


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    atomic_write(folder / "optimizer.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "optimizer.json", json.dumps({"param_groups": groups, "names": names}, indent=1).encode())


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["names"] != names:
        raise DataError(folder / "optimizer.json", 0, "the checkpoint was made for other trainable parameters")
    tensors = safetensors.torch.load(Path(folder / "optimizer.safetensors").read_bytes())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, names: list[str], st: State, run: dict[str, Any]
) -> Path:
    """Write ``checkpoints/step-N`` (via a temporary folder, renamed when complete) and ``adapter/``.

    Nothing half-written stays behind: on any error, Ctrl-C included, the temporary folder
    is removed and the older checkpoints are kept.

    Raises:
        NonFiniteError: the adapter holds NaN/Inf (from save_adapter; nothing was renamed).
        OSError: a file cannot be written.
    """
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{st.step:06d}"
    tmp = ckdir / f".step-{st.step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_adapter(model, tmp / "adapter")
        _save_optimizer(opt, tmp, names)
        rng = {"torch_rng": torch.get_rng_state()}
        atomic_write(tmp / "rng.safetensors", safetensors.torch.save(rng, metadata={"format": "pt"}))
        atomic_write(tmp / RUN_FILE, json.dumps(run, indent=1).encode())
        atomic_write(tmp / "state.json", json.dumps(asdict(st)).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in ckdir.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        # state.json first: a removal cut short (Ctrl-C) leaves a folder resume ignores, not a broken checkpoint
        (old / "state.json").unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    save_adapter(model, out / "adapter")
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def plot_losses(out: Path, st: State) -> None:
    """``loss.png``: training loss per step, eval loss at each evaluation (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(st.losses) + 1), st.losses, lw=0.8, label="train loss")
    if st.evals:
        ax.plot([e["step"] for e in st.evals], [e["eval_loss"] for e in st.evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "loss.png", png.getvalue())


# -- the run -------------------------------------------------------------------------------


def train(o: TrainOptions) -> dict[str, Any]:
    """Run ``lorakit hf train``; returns a summary dict (also written to ``out/metrics.json``).

    ``max_len`` above the model's context is clamped to it (a TrainWarning says so).

    Raises:
        ModelPathError, DataError, ConfigError: bad input, found before ``out`` is touched.
        ResumeMismatchError: ``resume=True`` with settings that differ from the saved run's
            (:mod:`lorakit.hf.resume`), found before ``out`` is touched.
        NonFiniteLossError: the loss became NaN/Inf; the run stops before that step is
            applied or saved, the checkpoints written so far stay as they are.
        KeyboardInterrupt: passed on as it came; no temporary file or folder stays behind
            and the checkpoints written so far stay as they are.
    """
    check_options(o)
    model_dir = _model_dir(o.model)
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"hf train: out must be a folder (new, empty, or a run to resume), got the file {out}")
    tokenizer = load_tokenizer(model_dir)
    data = load_data(o, tokenizer)
    o = fit_max_len(o, data.task, model_context(load_config(model_dir)))
    run = run_record(o, data.task)
    ckpt = latest_checkpoint(out) if o.resume else None
    if not o.resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"hf train: {out} exists and is not empty; pass resume=True or choose another out")
    if o.resume:
        if ckpt is None:
            raise ConfigError(f"hf train: resume=True but {out} holds no checkpoint")
        check_resume(ckpt, run)
    torch.manual_seed(o.seed)
    model = load_model(model_dir, data.task, data.labels)
    batcher = Batcher(data, tokenizer, o)
    if ckpt is None:
        inject(model, lora_config(model, o.targets, r=o.r, alpha=o.lora_alpha, dropout=o.dropout))
    else:
        load_adapter(model, ckpt / "adapter")
    if o.gradient_checkpointing:
        prepare_for_training(model)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if o.loraplus_ratio is None:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(loraplus_groups(model, o.lr, o.loraplus_ratio, o.weight_decay))
    # each group's starting lr, before a checkpoint's (decayed) values are loaded over it
    start_lrs = [float(g["lr"]) for g in opt.param_groups]
    st = State()
    if ckpt is not None:
        _load_optimizer(opt, ckpt, names)
        raw = json.loads((ckpt / "state.json").read_text())
        st = State(step=raw["step"], losses=raw["losses"], evals=raw["evals"])
        rng = safetensors.torch.load((ckpt / "rng.safetensors").read_bytes())
        torch.set_rng_state(rng["torch_rng"])
    out.mkdir(parents=True, exist_ok=True)
    if data.labels is not None:
        atomic_write(out / "labels.json", json.dumps(data.labels).encode())

    spe = batcher.steps_per_epoch()
    total = o.epochs * spe
    run_steps = 0
    bar = _progress(o, total, st.step)
    stopped = False
    t0 = time.perf_counter()
    try:
        while st.step < total:
            epoch, pos = divmod(st.step, spe)
            batches = batcher.epoch(epoch)
            for chunk in batches[pos:]:
                for g, lr in zip(opt.param_groups, start_lrs, strict=True):
                    g["lr"] = lr * (1.0 - st.step / total)
                loss = model(**batcher.collate(chunk)).loss
                value = float(loss.detach())
                if not math.isfinite(value):  # stop before a NaN reaches the adapter or the optimizer state
                    raise NonFiniteLossError(st.step + 1, value, latest_checkpoint(out))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                st.step += 1
                run_steps += 1
                st.losses.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{st.losses[-1]:.4f}")
                end_of_epoch = st.step % spe == 0
                if (o.eval_every and st.step % o.eval_every == 0) or end_of_epoch:
                    res = evaluate(model, batcher)
                    if res:
                        st.evals.append({"step": st.step, "epoch": st.step / spe, **res})
                        if bar is not None:
                            bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
                stop = bool(o.stop_after) and run_steps >= o.stop_after and st.step < total
                if (o.save_every and st.step % o.save_every == 0) or end_of_epoch or stop:
                    try:
                        _write_checkpoint(out, model, opt, names, st, run)
                    except NonFiniteError:
                        # The update of this step (finite loss, non-finite result, e.g. an lr far too
                        # large) broke the adapter; without a save here the next loss would show it.
                        raise NonFiniteLossError(st.step, value, latest_checkpoint(out), adapter=True) from None
                    plot_losses(out, st)
                if stop:
                    stopped = True
                    break
            if stopped:
                break
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "task": data.task,
        "steps": st.step,
        "total_steps": total,
        "stopped_early": stopped,
        "seconds": time.perf_counter() - t0,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "adapters": list_adapters(model),
        "evals": st.evals,
        "final_train_loss": st.losses[-1] if st.losses else None,
    }
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2).encode())
    return summary


def _progress(o: TrainOptions, total: int, initial: int) -> Any:
    if not o.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
