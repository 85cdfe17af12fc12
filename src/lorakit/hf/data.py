"""JSONL training data for ``lorakit hf train``: reading, checking, tokenizing, batching.

Two tasks, told apart by the fields of the records (``task=auto``)::

    causal    {"prompt": "...", "response": "..."}          loss on the response tokens only
              {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}
              (the last message is the response; the ones before it, rendered with the
              tokenizer's chat template, or "role: content" lines without one, the prompt)
    classify  {"text": "...", "label": "pos"}               labels: strings or ints

Every problem is a :class:`DataError` naming the file and the line (1-based), raised
before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraError

TASKS = ("causal", "classify")


class DataError(LoraError, ValueError):
    """A data file is missing, empty or has a bad record. ``path`` and ``line`` (0: the whole file) say where."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path = Path(path)
        self.line = line
        super().__init__(f"{self.path}{f':{line}' if line else ''}: {message}")


class ModelPathError(LoraError, ValueError):
    """The model path does not exist or is not a transformers model folder."""


@dataclass(frozen=True)
class Example:
    """One record: ``line`` in ``path``; ``prompt``/``response`` (causal) or ``text``/``label`` (classify)."""

    path: Path
    line: int
    prompt: str = ""
    response: str = ""
    text: str = ""
    label: Any = None


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    r"""``(line number, record)`` for every non-blank line of ``path``.

    Lines end at ``\n`` only (a ``\r`` before it is dropped), as JSON Lines says:
    ``str.splitlines`` would also break at U+2028, U+2029, U+0085 and other characters
    that JSON allows unescaped inside a string.

    Raises:
        DataError: no such file, unreadable, empty, a line that is not JSON or not an object.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, 0, "no such data file")
    try:
        text = p.read_bytes().decode("utf-8")  # not read_text: its newline translation is not JSON Lines
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(p, 0, f"cannot read: {exc}") from None
    rows = []
    for n, raw in enumerate(text.split("\n"), 1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(p, n, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(p, n, f"expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise DataError(p, 0, "the file has no records")
    return rows


def detect_task(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> str:
    """``"classify"`` when the first record has ``text`` and ``label``, ``"causal"`` when it has
    ``prompt``/``response`` or ``messages``; otherwise a DataError."""
    n, first = rows[0]
    if "text" in first or "label" in first:
        return "classify"
    if "prompt" in first or "response" in first or "messages" in first:
        return "causal"
    raise DataError(
        path, n, f"cannot tell the task from fields {sorted(first)}: expected prompt/response, messages, or text/label"
    )


def _string(path: Path, n: int, obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise DataError(path, n, f"missing field {key!r} (fields: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, n, f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _render(messages: list[dict[str, str]], tokenizer: Any) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def causal_examples(path: Path, rows: list[tuple[int, dict[str, Any]]], tokenizer: Any) -> list[Example]:
    out = []
    for n, obj in rows:
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or len(msgs) < 2:
                raise DataError(path, n, "field 'messages' must be a list of at least 2 messages")
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise DataError(path, n, f"messages[{i}] must be an object with string 'role' and 'content'")
            if msgs[-1]["role"] != "assistant":
                raise DataError(path, n, f"the last message must have role 'assistant', got {msgs[-1]['role']!r}")
            prompt = _render([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], tokenizer)
            out.append(Example(path, n, prompt=prompt, response=msgs[-1]["content"]))
        else:
            prompt, response = _string(path, n, obj, "prompt"), _string(path, n, obj, "response")
            out.append(Example(path, n, prompt=prompt, response=response))
    return out


def classify_examples(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[Example]:
    out = []
    for n, obj in rows:
        text = _string(path, n, obj, "text")
        if "label" not in obj:
            raise DataError(path, n, f"missing field 'label' (fields: {sorted(obj)})")
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(path, n, f"field 'label' must be a string or an integer, got {label!r}")
        out.append(Example(path, n, text=text, label=label))
    return out


def label_names(examples: list[Example]) -> list[str]:
    """The sorted label set of the training examples, as strings (ints sort numerically)."""
    labels = {e.label for e in examples}
    if all(isinstance(x, int) for x in labels):
        return [str(x) for x in sorted(labels)]
    return sorted(str(x) for x in labels)


def check_labels(examples: list[Example], names: list[str]) -> None:
    """Raises DataError for the first example whose label was not seen in training."""
    known = set(names)
    for e in examples:
        if str(e.label) not in known:
            raise DataError(e.path, e.line, f"label {e.label!r} was not seen in the training data (labels: {names})")


def encode_causal(e: Example, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: prompt tokens (labels -100) + response tokens + EOS. Over
    ``max_len`` the prompt is cut from the left, keeping at least half of the window for the response."""
    p = list(tokenizer(e.prompt, add_special_tokens=True)["input_ids"])
    r = list(tokenizer(e.response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r.append(int(tokenizer.eos_token_id))
    if len(p) + len(r) > max_len:
        r = r[: max(max_len - len(p), max_len // 2)]
        p = p[len(p) - (max_len - len(r)) :] if max_len > len(r) else []
    return p + r, [-100] * len(p) + r


def pad_id(tokenizer: Any) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def collate_causal(encoded: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_classify(
    examples: list[Example], tokenizer: Any, label_ids: dict[str, int], max_len: int
) -> dict[str, torch.Tensor]:
    enc = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([label_ids[str(e.label)] for e in examples], dtype=torch.long)
    return batch
