"""The options of ``lorakit hf train`` and their checks.

Values reach here from the command line through :func:`lorakit.cli.args.parse_value`,
so a value that is not a Python literal arrives as a string (``eval_fraction=nan`` is
the string ``'nan'``, ``resume=yes`` the string ``'yes'``): every option is checked for
its type as well as its range, and a bad one is a :class:`~lorakit.errors.ConfigError`
naming the key, what it must be and what it got.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ..config import finite_number
from ..errors import ConfigError


class TrainWarning(UserWarning):
    """Something ``hf train`` changed or applied on its own (a clamped ``max_len``, a changed lr on resume).
    The command prints it as one line."""


@dataclass(frozen=True)
class TrainOptions:
    """Every ``lorakit hf train`` key (same names on the command line)."""

    model: str
    data: str
    out: str
    eval: str | None = None  # eval JSONL; default: eval_fraction of data held out
    eval_fraction: float = 0.1
    task: str = "auto"  # auto | causal | classify
    r: int = 16
    # Default alpha = r (s = 1), as LoraConfig, lorakit.hf.lora_config and LoraYOLO: one meaning of alpha
    # everywhere. Under Adam the step of the update s*B*A scales with s*lr, so lr's default is 2e-3 (was 1e-3
    # with alpha = 2r): the same effective step as before.
    alpha: float | None = None
    dropout: float = 0.05
    targets: list[str] | str | None = None  # default: lorakit.hf.default_targets(model)
    epochs: int = 3
    lr: float = 2e-3
    weight_decay: float = 0.0
    # LoRA+ (lorakit.loraplus_groups): B factors learn at lr * loraplus_ratio (16 is the paper's choice),
    # A factors and the rest at lr. None: one lr for all.
    loraplus_ratio: float | None = None
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    eval_every: int = 0  # steps; 0: at the end of each epoch only
    save_every: int = 0  # steps; 0: at the end of each epoch only
    gradient_checkpointing: bool = False
    dora: bool = False  # DoRA (LoraConfig(dora=True)): a learned magnitude per output, besides B A
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda; under torchrun: each process's own device
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; the base and the adapters stay in fp32)
    grad_accum: int = 1  # batches per optimizer step
    warmup: int = 0  # steps of linear warmup from 0 to lr
    schedule: str = "linear"  # lr decay to 0 after warmup: linear | cosine
    max_steps: int = 0  # optimizer steps of the whole run; 0: epochs decide
    report_to: str = "none"  # none | tensorboard (logs under out/runs)
    # QLoRA (lorakit.hf.load_quantized): the base's Linear layers stored in 4 bits (nf4, fp4; double
    # quantisation) or 8 bits (int8), frozen; none: the base in fp32
    quantize: str = "none"
    # FSDP2 under torchrun (lorakit.hf.fsdp): the model (base and adapters) sharded across the
    # processes instead of copied to each (DDP); for a model that does not fit one device
    fsdp: bool = False
    resume: bool = False
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this run, as if interrupted
    progress: bool = True

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or its default ``r`` (scaling 1, as everywhere in lorakit)."""
        return float(self.r) if self.alpha is None else float(self.alpha)


CHOICES = {
    "task": ("auto", "causal", "classify"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "schedule": ("linear", "cosine"),
    "report_to": ("none", "tensorboard"),
    "quantize": ("none", "nf4", "fp4", "int8"),
}


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_options(o: TrainOptions) -> None:
    """Raises ConfigError for the first option of the wrong type or out of range."""

    def bad(name: str, expected: str) -> ConfigError:
        return ConfigError(f"hf train: {name} must be {expected}, got {getattr(o, name)!r}")

    for name in ("model", "data", "out"):
        if not isinstance(getattr(o, name), str) or not getattr(o, name):
            raise bad(name, "a non-empty path")
    if o.eval is not None and (not isinstance(o.eval, str) or not o.eval):
        raise bad("eval", "a non-empty path or None")
    for name in ("epochs", "batch_size", "max_len", "r", "grad_accum"):
        if not _int(getattr(o, name)) or getattr(o, name) <= 0:
            raise bad(name, "an int > 0")
    for name in ("eval_every", "save_every", "stop_after", "seed", "warmup", "max_steps"):
        if not _int(getattr(o, name)) or getattr(o, name) < 0:
            raise bad(name, "an int >= 0")
    for name in ("gradient_checkpointing", "resume", "progress", "dora", "fsdp"):
        if not isinstance(getattr(o, name), bool):
            raise bad(name, "True or False")
    if not finite_number(o.lr) or not o.lr > 0:
        raise bad("lr", "a finite number > 0")
    if not finite_number(o.weight_decay) or not o.weight_decay >= 0:
        raise bad("weight_decay", "a finite number >= 0")
    if o.loraplus_ratio is not None and (not finite_number(o.loraplus_ratio) or not o.loraplus_ratio > 0):
        raise bad("loraplus_ratio", "a finite number > 0 (B's lr / A's lr; 16 in the LoRA+ paper) or None")
    if not finite_number(o.eval_fraction) or not 0 <= o.eval_fraction < 1:
        raise bad("eval_fraction", "a number in [0, 1)")
    if not finite_number(o.dropout) or not 0 <= o.dropout < 1:
        raise bad("dropout", "a number in [0, 1)")
    if o.alpha is not None and (not finite_number(o.alpha) or not o.alpha > 0):
        raise bad("alpha", "a finite number > 0 or None")
    for name, allowed in CHOICES.items():
        if getattr(o, name) not in allowed:
            raise bad(name, " or ".join(", ".join(allowed).rsplit(", ", 1)))
    if o.fsdp and o.quantize != "none":
        raise ConfigError(
            f"hf train: fsdp=True cannot shard a quantised base (quantize={o.quantize!r}: its packed weights are not "
            "plain tensors); use fsdp=False (DDP) or quantize='none'"
        )
    t = o.targets
    if t is not None and not (
        (isinstance(t, str) and t) or (isinstance(t, list) and t and all(isinstance(x, str) and x for x in t))
    ):
        raise bad("targets", "a module name pattern, a list of them, or None")


def model_context(config: Any) -> int | None:
    """The most positions ``config``'s model takes (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None when the config states no such limit."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def fit_max_len(o: TrainOptions, task: str, context: int | None) -> TrainOptions:
    """``o`` with ``max_len`` clamped to the model's ``context`` (a TrainWarning says so).

    Raises:
        ConfigError: a causal ``max_len`` below 2: with one token there is nothing to predict
            (the first token has no predecessor), every label is masked and the loss is NaN.
    """
    if context is not None and o.max_len > context:
        warnings.warn(
            f"max_len {o.max_len} is more than the model's context of {context} positions; using max_len={context}",
            TrainWarning,
            stacklevel=3,
        )
        o = dataclasses.replace(o, max_len=context)
    if task == "causal" and o.max_len < 2:
        raise ConfigError(
            f"hf train: max_len={o.max_len} leaves no response token to train on; a causal example needs "
            "max_len >= 2 (a prompt token and a response token to predict from it)"
        )
    return o
