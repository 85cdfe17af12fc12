"""Reading JSONL data for ``hf train``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.hf.data import DataError, read_jsonl
from lorakit.hf.train import train

from .runs import opts


def test_jsonl_lines_end_at_newline_only(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Issue item 7: U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string, but
    str.splitlines broke the line there and the record was rejected. \\r\\n endings still work."""
    recs = [
        {"prompt": "say one\u2028two :", "response": "one\u2029two"},
        {"prompt": "say\u0085three :", "response": "three"},
        {"text": "it was\u2028good", "label": "pos"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs).encode() + b"\r\n")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    assert read_jsonl(path) == [(1, recs[0]), (2, recs[1]), (3, recs[2])]
    # Line numbers stay those of an editor: a bad line after them is reported as line 5.
    path.write_bytes(path.read_bytes() + b"\r\n" + b'{"prompt": \r\n')
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_jsonl(path)
    assert info.value.line == 5
    # And hf train takes such a file.
    causal = tmp_path / "c.jsonl"
    causal.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs[:2] * 3).encode())
    assert train(opts(tiny_models["gpt2"], causal, tmp_path / "run", stop_after=1))["steps"] == 1
