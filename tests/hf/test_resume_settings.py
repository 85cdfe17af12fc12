"""``hf train resume=True`` with changed settings (issue item 4): a change to the run is refused
naming each key with its saved and new value; a changed lr or epoch count is applied with a warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.hf.train import latest_checkpoint, train

from .runs import causal_data, classify_data, cli_args, opts, write_jsonl


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_refuses_changed_settings_naming_each(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 4: a causal run resumed on classification data (and another r and seed) used to
    run on silently; now every changed key is named with its saved and new value, and out is untouched."""
    gpt2, data, out = tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    train(opts(gpt2, data, out, stop_after=1))
    before = _files(out)
    cls = classify_data(tmp_path / "c.jsonl")
    with pytest.raises(ConfigError) as info:
        train(opts(gpt2, cls, out, r=8, seed=1, resume=True))
    changes = getattr(info.value, "changes", {})
    assert changes == {
        "data": ({"path": str(data), "sha256": changes["data"][0]["sha256"]},
                 {"path": str(cls), "sha256": changes["data"][1]["sha256"]}),
        "task": ("causal", "classify"), "r": (4, 8), "alpha": (4.0, 8.0), "seed": (0, 1),  # alpha defaults to r
    }  # fmt: skip
    msg = str(info.value)
    for part in ("task: saved 'causal', now 'classify'", "r: saved 4, now 8", "seed: saved 0, now 1",
                 f"data: saved '{data}' (sha256 ", f"now '{cls}' (sha256 ", str(latest_checkpoint(out))):  # fmt: skip
        assert part in msg, (part, msg)
    assert _files(out) == before

    # Same path, other content: the data is compared by its hash.
    original = data.read_bytes()
    write_jsonl(data, [{"prompt": "say red", "response": "red"}] * 20)
    with pytest.raises(ConfigError, match=r"1 setting\(s\) differ.*data: saved '.*d\.jsonl' \(sha256 \w{12}\), now"):
        train(opts(gpt2, data, out, resume=True))
    # And through the command: exit 2, one line naming the keys.
    capsys.readouterr()
    assert main(["hf", "train", *cli_args(gpt2, data, out, max_len=16, resume=True)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "data: saved" in errors[0] and "max_len: saved 32, now 16" in errors[0], errors
    assert _files(out) == before

    # The same content at another path is the same run.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(original)
    assert train(opts(gpt2, moved, out, stop_after=1, resume=True))["steps"] == 2


def test_resume_applies_a_changed_lr_and_epochs_with_a_warning(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 4: lr and epochs may change on resume; each change is a warning, and applied."""
    gpt2, data, out = tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), tmp_path / "run"
    train(opts(gpt2, data, out, stop_after=1))
    with pytest.warns(UserWarning) as record:
        summary = train(opts(gpt2, data, out, lr=5e-3, epochs=3, stop_after=1, resume=True))
    shown = [str(w.message) for w in record]
    assert any("lr changed from 0.01 to 0.005" in m for m in shown), shown
    assert any("epochs changed from 2 to 3" in m for m in shown), shown
    assert summary["steps"] == 2 and summary["total_steps"] == 15  # 5 steps per epoch
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    # Step 2 ran at the new lr on the new schedule: lr * (1 - 1/15); the optimizer holds step 3's.
    logged = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    assert [h["learning_rate"] for h in logged if h.get("step") == 2 and "loss" in h] == [
        pytest.approx(5e-3 * 14 / 15, rel=1e-12)
    ]
    lr = json.loads((ckpt / "optimizer.json").read_text())["param_groups"][0]["lr"]
    assert lr == pytest.approx(5e-3 * 13 / 15, rel=1e-12)
    run = json.loads((ckpt / "run.json").read_text())
    assert (run["lr"], run["epochs"]) == (5e-3, 3)
    # A checkpoint from before run.json cannot be checked: a warning says so, and the run goes on.
    (ckpt / "run.json").unlink()
    with pytest.warns(UserWarning, match="has no run.json; the resumed settings cannot be checked"):
        assert train(opts(gpt2, data, out, lr=5e-3, epochs=3, stop_after=1, resume=True))["steps"] == 3
    # The command prints each warning as one line.
    capsys.readouterr()
    assert main(["hf", "train", *cli_args(gpt2, data, out, lr=1e-3, epochs=3, stop_after=1, resume=True)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert warned == [
        "lorakit hf train: warning: resume: lr changed from 0.005 to 0.001; the new value applies from here on"
    ]
