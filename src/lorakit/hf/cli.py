"""``lorakit hf train|generate|compare key=value ...``: the transformers verbs.

    lorakit hf train model=PATH data=FILE.jsonl r=16 epochs=3 out=DIR [eval=FILE.jsonl] [resume=True]
    lorakit hf generate model=PATH [adapter=DIR] prompt="..." [max_new_tokens=64] [chat=False]
    lorakit hf compare model=PATH data=FILE.jsonl [epochs=3] [base_data=FILE.jsonl] [strategies=...]

``train`` keys are the fields of :class:`lorakit.hf.train.TrainOptions`; see
:mod:`lorakit.hf.train` for what ``out`` holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, cast

from ..cli.args import ArgError, did_you_mean, parse_args

USAGE = """usage: lorakit hf SUBVERB key=value ...

  train     LoRA fine-tuning of a local transformers model on JSONL data
            lorakit hf train model=PATH data=FILE.jsonl out=DIR [r=16] [epochs=3] [eval=FILE.jsonl]
                  [alpha=r] [lr=2e-3] [batch_size=8] [max_len=256] [eval_every=0] [save_every=0] [resume=False]
                  [loraplus_ratio=None] [dora=False] [device=auto] [precision=fp32|bf16|fp16] [grad_accum=1]
                  [warmup=0] [schedule=linear|cosine] [max_steps=0] [gradient_checkpointing=False]
                  [report_to=none|tensorboard] [seed=0] ...
            several processes (DDP): torchrun --nproc_per_node=N -m lorakit.cli hf train ...
                  [fsdp=False]  (True: the model sharded across the processes, FSDP2)
            records: {"prompt","response"} or {"messages":[...]} (causal LM, loss on the response),
                     {"text","label"} (classification)
  generate  greedy generation with an adapter
            lorakit hf generate model=PATH [adapter=DIR] prompt=TEXT [max_new_tokens=64] [chat=False]
  compare   train full, partial, head-only, LoRA (r=4, 8, 16), DoRA and LoRA+ on the same data and budget;
            one table (eval loss, trainable params, bytes stored per task, s/epoch, peak memory,
            forgetting), its verdicts and a plot; an interrupted comparison goes on where it stopped
            lorakit hf compare model=PATH data=FILE.jsonl [epochs=3] [base_data=FILE.jsonl]
                  [strategies=full,lora-r8,...] [out=runs/hf-compare] [overwrite=False] [plain_lr=5e-5]
                  [any hf train setting but r, dora, loraplus_ratio: lr, batch_size, max_len, device...]
"""

GENERATE_KEYS = {"model", "adapter", "prompt", "max_new_tokens", "chat"}


def run(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "train":
        return _train(rest)
    if sub == "generate":
        return _generate(rest)
    if sub == "compare":
        return _compare(rest)
    subs = ("train", "generate", "compare")
    raise ArgError(f"unknown hf subverb {sub!r}{did_you_mean(sub, subs)}; use train, generate or compare")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as on Ctrl-C (checkpoints intact)."""


_signals: list[int] = []  # the stop signals received during this run, in order


def _stop_exception() -> KeyboardInterrupt:
    return Terminated() if _signals[-1] == signal.SIGTERM else KeyboardInterrupt()


def _on_stop_signal(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise _stop_exception()


def _stop_callback() -> Any:
    """A Trainer callback that raises the stop signal's exception again at the end of each step.

    The handler's exception is raised wherever Python is when the signal arrives; inside a
    finaliser (a ``__del__`` or a garbage-collector callback) Python prints "Exception
    ignored" and goes on, and the run would train on. Once a signal has come, no further
    step is finished.
    """
    from transformers import TrainerCallback

    class StopAfterSignal(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if _signals:
                raise _stop_exception()

    return StopAfterSignal()


def _train(argv: list[str]) -> int:
    """Ctrl-C or SIGTERM stops the run: the last checkpoint is named on one line, exit status
    130 (Ctrl-C) or 143 (SIGTERM), as shells report them."""
    from .options import TrainOptions, TrainWarning
    from .train import latest_checkpoint, train

    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    args = parse_args(argv, fields, "hf train")
    missing = [k for k in ("model", "data", "out") if k not in args]
    if missing:
        raise ArgError(f"hf train needs {', '.join(k + '=...' for k in missing)}")
    for key in ("model", "data", "out", "eval"):
        if key in args and args[key] is not None:
            args[key] = str(args[key])
    try:
        opts = TrainOptions(**args)
    except TypeError as exc:
        raise ArgError(f"hf train: {exc}") from None
    _signals.clear()
    previous = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _one_line(TrainWarning, "lorakit hf train: warning: "):
            summary = train(opts, callbacks=[_stop_callback()])
    except KeyboardInterrupt as exc:
        ckpt = latest_checkpoint(Path(opts.out))
        where = f"the last checkpoint is {ckpt} (resume=True continues from it)" if ckpt else "no checkpoint yet"
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"lorakit hf train: {how}; {where}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130  # 128 + the signal's number
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, only the main process reports
    last = summary["evals"][-1] if summary["evals"] else {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("eval_"))
    state = "stopped (resume=True continues)" if summary["stopped_early"] else "done"
    print(f"{state}: {summary['steps']}/{summary['total_steps']} steps{'; ' + shown if shown else ''}; "
          f"adapter in {Path(opts.out) / 'adapter'}")  # fmt: skip
    return 0


@contextlib.contextmanager
def _one_line(kind: type[Warning], prefix: str) -> Iterator[None]:
    """Warnings of ``kind`` are printed to stderr as one line each (no file and line of code)."""
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always", kind)
        previous = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:  # fmt: skip
            if issubclass(category, kind):
                print(f"{prefix}{message}", file=sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _generate(argv: list[str]) -> int:
    import torch

    from ..errors import ConfigError
    from ..io import load_adapter
    from .options import model_context
    from .train import _model_dir, load_model, load_tokenizer

    args: dict[str, Any] = parse_args(argv, GENERATE_KEYS, "hf generate")
    if "model" not in args or "prompt" not in args:
        raise ArgError("hf generate needs model=... and prompt=...")
    prompt = str(args["prompt"])
    if not prompt.strip():
        raise ConfigError(f"hf generate: prompt must be a non-empty text, got {args['prompt']!r}")
    max_new = args.get("max_new_tokens", 64)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"hf generate: max_new_tokens must be an int >= 1, got {max_new!r}")
    chat = args.get("chat", False)
    if not isinstance(chat, bool):
        raise ConfigError(f"hf generate: chat must be True or False, got {chat!r}")
    path = _model_dir(str(args["model"]))
    tok = load_tokenizer(path)
    model = load_model(path, "causal", None).eval()
    if args.get("adapter") is not None:
        load_adapter(model, str(args["adapter"]))
    if chat and getattr(tok, "chat_template", None):
        prompt = str(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True))  # fmt: skip
    enc = tok(prompt, return_tensors="pt")
    n = int(enc["input_ids"].shape[1])
    context = model_context(getattr(model, "config", None))
    if n == 0:
        raise ConfigError(f"hf generate: prompt {args['prompt']!r} gives no tokens")
    if context is not None and n + max_new > context:
        raise ConfigError(
            f"hf generate: the prompt's {n} tokens + max_new_tokens={max_new} exceed the model's context of "
            f"{context} positions; use max_new_tokens <= {context - n}" if n < context else
            f"hf generate: the prompt's {n} tokens fill the model's context of {context} positions; shorten it"
        )  # fmt: skip
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = cast(Any, model).generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
    print(tok.decode(out[0, n:], skip_special_tokens=True))
    return 0


COMPARE_KEYS = {"model", "data", "epochs", "base_data", "strategies", "out", "overwrite", "plain_lr"}


def _compare(argv: list[str]) -> int:
    from .comparison import compare
    from .options import TrainOptions

    # every hf train key passes here, so that compare says why one it sets itself (r=...) is refused
    train_keys = {f.name for f in dataclasses.fields(TrainOptions)}
    args = parse_args(argv, COMPARE_KEYS | train_keys, "hf compare")
    missing = [k for k in ("model", "data") if k not in args]
    if missing:
        raise ArgError(f"hf compare needs {', '.join(k + '=...' for k in missing)}")
    overwrite = args.pop("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ArgError(f"hf compare: overwrite must be True or False, got {overwrite!r}")
    for key in ("model", "data", "out", "base_data", "eval"):
        if args.get(key) is not None:
            args[key] = str(args[key])  # a path, whatever it looks like (``1``, ``a,b``)
    result = compare(
        args.pop("model"),
        args.pop("data"),
        out=args.pop("out", "runs/hf-compare"),
        overwrite=overwrite,
        **args,  # epochs, base_data, strategies, plain_lr and hf train's settings, checked by compare
    )
    print("\n" + result.markdown)
    print(f"wrote {result.folder / 'results.md'}, results.json, results.png")
    return 0
