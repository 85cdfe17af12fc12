"""``lorakit hf train|generate``: outputs, PEFT loading, exact resume, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import lorakit
from lorakit.cli import main
from lorakit.hf.data import DataError, ModelPathError
from lorakit.hf.train import train

from .runs import causal_data, classify_data, opts, tensors, write_jsonl


def test_causal_train_outputs_peft_and_exact_resume(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = causal_data(tmp_path / "d.jsonl")
    full = train(opts(tiny_models["gpt2"], data, tmp_path / "full", save_every=4, eval_every=3))
    out = tmp_path / "full"
    assert full["steps"] == full["total_steps"] == 10 and not full["stopped_early"]
    losses = json.loads((sorted((out / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())["losses"]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2 and not list((out / "checkpoints").glob(".*"))
    assert [e["step"] for e in full["evals"]] == [3, 5, 6, 9, 10]

    # Interrupted after 3 steps, then resumed (twice): bitwise the uninterrupted run.
    part = tmp_path / "part"
    first = train(opts(tiny_models["gpt2"], data, part, save_every=4, eval_every=3, stop_after=3))
    assert first["stopped_early"] and first["steps"] == 3
    train(opts(tiny_models["gpt2"], data, part, save_every=4, eval_every=3, stop_after=4, resume=True))
    train(opts(tiny_models["gpt2"], data, part, save_every=4, eval_every=3, resume=True))
    a, b = tensors(out / "adapter", "adapter_model.safetensors"), tensors(part / "adapter", "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (sorted((d / "checkpoints").glob("step-*"))[-1] for d in (out, part))
    oa, ob = tensors(last_a, "optimizer.safetensors"), tensors(last_b, "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert json.loads((last_a / "state.json").read_text()) == json.loads((last_b / "state.json").read_text())

    # The adapter the command wrote loads in PEFT with the same logits.
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[4, 17, 18, 35]])
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    lorakit.load_adapter(ours, out / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), str(out / "adapter")
        ).eval()
    with torch.no_grad():
        lo, lt = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        with lorakit.disabled(ours):
            assert not torch.allclose(ours(input_ids=ids).logits, lo, atol=1e-4)
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-5)


def test_classify_and_generate_commands(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = classify_data(tmp_path / "c.jsonl")
    out = tmp_path / "cls"
    code = main(["hf", "train", f"model={tiny_models['bert']}", f"data={data}", f"out={out}", "r=4", "epochs=6",
                 "lr=2e-2", "batch_size=6", "progress=False", "eval_fraction=0.2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classify" and metrics["evals"][-1]["eval_accuracy"] >= 0.0
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    assert not any("classifier" in t or "pooler" in t for t in cfg["target_modules"])

    gen_out = tmp_path / "gen"
    train(opts(tiny_models["gpt2"], causal_data(tmp_path / "d.jsonl"), gen_out, epochs=1))
    capsys.readouterr()
    code = main(["hf", "generate", f"model={tiny_models['gpt2']}", f"adapter={gen_out / 'adapter'}",
                 "prompt=repeat one two :", "max_new_tokens=3"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out.strip()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    lorakit.load_adapter(model, gen_out / "adapter")
    enc = tok("repeat one two :", return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, enc["input_ids"].shape[1] :]
    assert printed == tok.decode(ids, skip_special_tokens=True).strip()


BAD = {
    "not_json": ('{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', 2, "not valid JSON"),
    "missing_field": ('{"prompt": "a", "response": "b"}\n{"prompt": "x"}\n', 2, "missing field 'response'"),
    "empty": ("\n\n", 0, "no records"),
    "not_object": ('{"text": "a", "label": 1}\n[1, 2]\n', 2, "expected a JSON object"),
    "bad_messages": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}\n', 1,
                     "role 'assistant'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_a_typed_error_naming_file_and_line(
    case: str, tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, line, msg = BAD[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=msg) as info:
        train(opts(tiny_models["gpt2"], data, out))
    assert info.value.path == data and info.value.line == line
    assert str(info.value).startswith(f"{data}:{line}:" if line else f"{data}:")
    assert not out.exists()
    assert main(["hf", "train", f"model={tiny_models['gpt2']}", f"data={data}", f"out={out}"]) == 2
    assert f"{data}" in capsys.readouterr().err and not out.exists()


def test_unseen_label_and_missing_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = classify_data(tmp_path / "c.jsonl")
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": "it was good", "label": "pos"}, {"text": "x", "label": "meh"}])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="label 'meh' was not seen") as info:
        train(opts(tiny_models["bert"], data, out, eval=str(ev)))
    assert info.value.path == ev and info.value.line == 2 and not out.exists()
    with pytest.raises(ModelPathError, match="no such model folder"):
        train(opts(tmp_path / "nope", data, out))
    assert not out.exists()
    with pytest.raises(lorakit.ConfigError, match="no checkpoint"):
        train(opts(tiny_models["bert"], data, out, resume=True))
    assert not out.exists()
