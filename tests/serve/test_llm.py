"""``lorakit serve llm``: OpenAI-compatible completions over a real uvicorn server on 127.0.0.1.

A tiny random Llama (built from a config, saved with a word-level tokenizer) and three random
adapters. Every greedy answer must equal the same prompt generated alone (no batching, no KV cache)
with its adapter, while concurrent requests for different adapters are decoded in shared waves."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import transformers

import lorakit
from lorakit.serve import content_version
from lorakit.serve.app import in_thread as running

from ..hf.conftest import _tokenizer  # the word-level tokenizer of the hf tests' tiny models
from .clients import run_clients

MAX_TOKENS = 12
PROMPTS = ["the color of sky is", "one two", "repeat say good movie film great", "love", "snow is white red one"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("serve_llm")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=len(tok), max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    store = root / "store"
    for i, name in enumerate(("a", "b", "c")):
        m = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        lorakit.inject(m, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj", "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(m):
                layer.lora["default"].B.normal_(0, 1.0, generator=gen)
        lorakit.save_adapter(m, store / name)
    return SimpleNamespace(root=root, base=root / "base", store=store, tok=tok)


def greedy_alone(base: Path, adapter: Path, ids: list[int], max_tokens: int, eos: int) -> list[int]:
    """Greedy tokens of one prompt on base + adapter: one sequence, the full forward every step, no cache."""
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    lorakit.load_adapter(model, adapter)
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            seq.append(token)
    return out


@pytest.fixture(scope="module")
def served(world: SimpleNamespace) -> Iterator[SimpleNamespace]:
    from lorakit.serve.llm import LlmService, llm_server

    service = LlmService(
        world.base, world.store, budget_bytes=2**30, pinned=("a",), max_batch=8, window_s=0.05, max_tokens=32
    )
    service.store.preload()
    with running(llm_server(service, max_body=16 * 1024).app) as url:
        yield SimpleNamespace(url=url, service=service)


@pytest.fixture(scope="module")
def offline(world: SimpleNamespace) -> dict[tuple[str, str], str]:
    out = {}
    for name in ("a", "b", "c"):
        for p in PROMPTS:
            ids = [int(i) for i in world.tok(p)["input_ids"]]
            got = greedy_alone(world.base, world.store / name, ids, MAX_TOKENS, eos=2)
            out[(name, p)] = world.tok.decode(got, skip_special_tokens=True)
    return out


def test_adapters_answer_differently(offline: dict[tuple[str, str], str]) -> None:
    """The cross-talk check below is not vacuous."""
    for p in PROMPTS[:3]:
        assert len({offline[(n, p)] for n in ("a", "b", "c")}) == 3, [offline[(n, p)] for n in ("a", "b", "c")]


def test_concurrent_requests_are_batched_and_equal_their_answer_alone(
    world: SimpleNamespace, served: SimpleNamespace, offline: dict[tuple[str, str], str]
) -> None:
    jobs = [(n, p) for n in ("a", "b", "c") for p in PROMPTS]
    random.Random(0).shuffle(jobs)
    failures: list[str] = []
    before = served.service.batcher.stats()

    def client(part: list[tuple[str, str]]) -> None:
        with httpx.Client(timeout=60) as c:
            for name, prompt in part:
                r = c.post(
                    f"{served.url}/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS}
                )
                body = r.json()
                want = offline[(name, prompt)]
                if r.status_code != 200 or body["choices"][0]["text"] != want or body["adapter"] != name:
                    failures.append(f"{name} {prompt!r}: {r.status_code} {r.text[:300]} != {want!r}")
                version = content_version(lorakit.read_adapter_files(world.store / name))
                if body.get("adapter_version") != version or r.headers.get("X-Lorakit-Adapter-Version") != version:
                    failures.append(f"{name}: version {body.get('adapter_version')}")

    run_clients(client, jobs)
    assert not failures, failures[:5]
    after = served.service.batcher.stats()
    rows, waves = after["rows"] - before["rows"], after["waves"] - before["waves"]
    assert rows == len(jobs) and waves < rows  # several requests shared a forward


def test_streaming_and_chat(
    world: SimpleNamespace, served: SimpleNamespace, offline: dict[tuple[str, str], str]
) -> None:
    prompt = PROMPTS[2]
    with httpx.Client(timeout=60) as c:
        body = {"model": "b", "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True}
        with c.stream("POST", f"{served.url}/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == offline[("b", prompt)]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        messages = [{"role": "user", "content": "the color of sky"}]
        r = c.post(f"{served.url}/v1/chat/completions", json={"model": "c", "messages": messages, "max_tokens": 8})
        ids = served.service.prompt_ids({"messages": messages}, chat=True)
        want = world.tok.decode(greedy_alone(world.base, world.store / "c", ids, 8, eos=2), skip_special_tokens=True)
        assert r.status_code == 200 and r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert {m["id"] for m in c.get(f"{served.url}/v1/models").json()["data"]} == {"a", "b", "c"}


def test_bad_input_is_answered_and_the_server_keeps_serving(served: SimpleNamespace) -> None:
    post = f"{served.url}/v1/completions"
    ok = {"model": "a", "prompt": "one", "max_tokens": 2}
    with httpx.Client(timeout=60) as c:
        cases: list[tuple[str, httpx.Response, int]] = [
            ("unknown", c.post(post, json={**ok, "model": "zz"}), 404),
            ("escape", c.post(post, json={**ok, "model": "../store/a"}), 400),
            ("bad json", c.post(post, content=b"{", headers={"content-type": "application/json"}), 400),
            ("no prompt", c.post(post, json={"model": "a"}), 400),
            ("max_tokens", c.post(post, json={**ok, "max_tokens": 10_000}), 400),
            ("temperature", c.post(post, json={**ok, "temperature": "hot"}), 400),
            ("too big", c.post(post, json={**ok, "prompt": "one " * 10_000}), 413),
            ("chat without messages", c.post(f"{served.url}/v1/chat/completions", json={"model": "a"}), 400),
        ]
        for what, r, status in cases:
            assert r.status_code == status, (what, r.text)
            assert r.json()["error"]["code"] == status
            assert c.post(post, json=ok).status_code == 200, what
        assert set(cases[0][1].json()["error"]["available"]) == {"a", "b", "c"}
