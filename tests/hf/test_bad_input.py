"""Input ``hf train``/``hf generate`` used to crash on with a raw traceback (issue item 10):
out-of-range values, an ``out`` that is a file, an empty prompt. Each is now a typed error:
exit 2 and one line naming the key, what it must be and the value given."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.cli import main

from .runs import causal_data, cli_args, write_jsonl

BAD_TRAIN = {
    "eval_fraction=nan": "eval_fraction must be a number in [0, 1), got 'nan'",
    "eval_fraction=1.5": "eval_fraction must be a number in [0, 1), got 1.5",
    "eval_fraction=-0.1": "eval_fraction must be a number in [0, 1), got -0.1",
    "lr=1e999": "lr must be a finite number > 0, got inf",
    "lr=fast": "lr must be a finite number > 0, got 'fast'",
    "weight_decay=-1": "weight_decay must be a finite number >= 0, got -1",
    "batch_size=0": "batch_size must be an int > 0, got 0",
    "max_len=2.5": "max_len must be an int > 0, got 2.5",
    "seed=-1": "seed must be an int >= 0, got -1",
    "dropout=1": "dropout must be a number in [0, 1), got 1",
    "alpha=0": "alpha must be a finite number > 0 or None, got 0",
    "resume=yes": "resume must be True or False, got 'yes'",
    "progress=maybe": "progress must be True or False, got 'maybe'",
    "task=seq2seq": "task must be auto, causal or classify, got 'seq2seq'",
}


@pytest.mark.parametrize("token", sorted(BAD_TRAIN))
def test_train_bad_value_is_one_line_exit_2(
    token: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 10: eval_fraction=nan (and other out-of-range values) raised raw TypeErrors or ran on."""
    data, out = causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out), token]) == 2
    err = capsys.readouterr().err
    assert err == f"lorakit hf: error: hf train: {BAD_TRAIN[token]}\n"
    assert not out.exists()


def test_train_out_that_is_a_file(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 10: out=<an existing file> raised a raw NotADirectoryError."""
    data = causal_data(tmp_path / "d.jsonl")
    out = write_jsonl(tmp_path / "taken.jsonl", [{"keep": 1}])
    before = out.read_bytes()
    expected = f"out must be a folder (new, empty, or a run to resume), got the file {out}"
    for extra in ([], ["resume=True"]):
        assert main(["hf", "train", *cli_args(tiny_models["gpt2"], data, out), *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"lorakit hf: error: hf train: {expected}\n"
    assert out.read_bytes() == before


BAD_GENERATE = {
    "prompt=": "prompt must be a non-empty text, got ''",
    "prompt=   ": "prompt must be a non-empty text, got '   '",
    "max_new_tokens=-1": "max_new_tokens must be an int >= 1, got -1",
    "max_new_tokens=0": "max_new_tokens must be an int >= 1, got 0",
    "max_new_tokens=many": "max_new_tokens must be an int >= 1, got 'many'",
    "chat=maybe": "chat must be True or False, got 'maybe'",
    # past the 64 positions: GPT-2 raises a raw IndexError if generation gets there (no EOS before)
    "max_new_tokens=100": "the prompt's 3 tokens + max_new_tokens=100 exceed the model's context of 64 positions; "
    "use max_new_tokens <= 61",
}


@pytest.mark.parametrize("token", sorted(BAD_GENERATE))
def test_generate_bad_value_is_one_line_exit_2(
    token: str, tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 10: hf generate prompt="" and max_new_tokens=-1 raised raw tracebacks."""
    key, value = token.split("=", 1)
    args = {"model": tiny_models["gpt2"], "prompt": "repeat one :", key: value}
    assert main(["hf", "generate", *(f"{k}={v}" for k, v in args.items())]) == 2
    err = capsys.readouterr().err
    # (transformers may draw a "Loading weights" bar on stderr too: the count is of error lines)
    assert [line for line in err.splitlines() if "error" in line] == [
        f"lorakit hf: error: hf generate: {BAD_GENERATE[token]}"
    ]
    assert "Traceback" not in err
