"""Data files and options for ``lorakit hf train`` runs in the tests (the models: conftest.tiny_models)."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from lorakit.hf.train import TrainOptions

NUMS = ["one", "two", "three", "four", "five"]
# opts()'s settings as command-line tokens (a CLI run and an opts() run are the same run).
OPTS = {"r": 4, "epochs": 2, "batch_size": 4, "lr": 1e-2, "dropout": 0.1, "progress": False, "max_len": 32}


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def causal_data(path: Path) -> Path:
    """20 records: 18 train (5 steps of 4 per epoch), 2 eval."""
    recs: list[object] = [{"prompt": f"repeat {a} {b} :", "response": f"{a} {b}"} for a in NUMS for b in NUMS[:4]]
    recs[3] = {"messages": [{"role": "user", "content": "say one"}, {"role": "assistant", "content": "one"}]}
    return write_jsonl(path, recs)


def classify_data(path: Path, extra: list[object] | None = None) -> Path:
    recs: list[object] = []
    for a in ("great", "good", "love"):
        for b in ("movie", "film", "it"):
            recs.append({"text": f"{b} was {a}", "label": "pos"})
            recs.append({"text": f"{b} was not {a}", "label": "neg"})
    return write_jsonl(path, recs + (extra or []))


def opts(model: Path, data: Path, out: Path, **kw: object) -> TrainOptions:
    base: dict[str, object] = dict(OPTS)
    base.update(kw)
    return TrainOptions(model=str(model), data=str(data), out=str(out), **base)  # type: ignore[arg-type]


def cli_args(model: Path, data: Path, out: Path, **kw: object) -> list[str]:
    """``hf train`` command-line tokens for the run ``opts(model, data, out, **kw)``."""
    return [f"model={model}", f"data={data}", f"out={out}", *(f"{k}={v}" for k, v in {**OPTS, **kw}.items())]


def tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load((folder / name).read_bytes())


def leftovers(out: Path) -> list[Path]:
    """Temporary files or folders (``.name...``) anywhere under ``out``."""
    return sorted(out.rglob(".*"))
