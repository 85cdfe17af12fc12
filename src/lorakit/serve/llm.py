"""``lorakit serve llm``: OpenAI-compatible completions from one base model, the adapter named by ``model``.

``POST /v1/completions`` ``{"model": ADAPTER, "prompt": "...", "max_tokens": 16, "temperature": 0,
"stream": false}`` and ``POST /v1/chat/completions`` ``{"model": ADAPTER, "messages": [{"role": "user",
"content": "..."}], ...}`` answer as OpenAI's API does (``choices``, ``usage``), plus ``adapter`` and
``adapter_version``; ``"stream": true`` sends server-sent events (``data: {chunk}``, then
``data: [DONE]``). ``model`` naming the adapter is the convention of vLLM and LoRAX.

Every cached adapter is loaded into the one shared model under its own slot name
(``NAME__n``; a changed file gets a new slot, the old one is deleted when its last request ends).
Requests are decoded by :class:`~lorakit.serve.llm_batch.Batcher`, which batches requests for
different adapters into one forward with :func:`lorakit.mixed_batch`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from torch import nn

from ..adapters import delete_adapter, set_adapter
from ..io import load_adapter
from ..layers import LoraAdapter
from ..state import lora_layers
from .app import Server, adapter_headers, error_body, read_json
from .errors import BadRequestError, ServeError
from .llm_batch import Batcher, Job
from .store import AdapterStore, Entry


def _int(payload: dict[str, Any], key: str, default: int, high: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise BadRequestError(f"{key!r}: expected an int in [1, {high}], got {value!r}")
    return value


class LlmService:
    """The language-model server's model side: the shared model, its adapter slots and the batcher.

    Args:
        model: a transformers causal-LM folder (with its tokenizer).
        adapters: the store folder. budget_bytes, pinned: as :class:`AdapterStore`.
        max_batch, window_s: the batcher's wave size and how long it waits to fill a wave.
        max_tokens: the most tokens one request may ask for.
        dtype, device: where and how the model is held (``float32``, ``bfloat16``, ...; ``cpu``, ``cuda``).

    Raises:
        ConfigError: a bad store folder or budget; transformers' errors for a bad model folder.
    """

    def __init__(
        self,
        model: str | Path,
        adapters: str | Path,
        *,
        budget_bytes: int,
        pinned: tuple[str, ...] = (),
        max_batch: int = 16,
        window_s: float = 0.005,
        max_tokens: int = 256,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        import torch
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
        self.model = cast(
            nn.Module,
            transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype)),
        )
        self.model.to(device).eval()
        self.name = Path(model).name
        self.max_tokens = max_tokens
        self.lock = threading.RLock()
        self._ids = itertools.count()
        eos = self.tokenizer.eos_token_id
        config: Any = getattr(self.model, "config", None)
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (min(eos_ids, default=0))
        self.batcher = Batcher(
            self.model, eos=eos_ids, pad=int(pad), model_lock=self.lock, max_batch=max_batch, window_s=window_s
        )
        self.vocab = int(getattr(config, "vocab_size", 0) or 0)
        self.store: AdapterStore[str] = AdapterStore(
            adapters, self.load, budget_bytes=budget_bytes, pinned=pinned, unload=self.unload
        )

    def load(self, name: str, folder: Path) -> tuple[str, int]:
        """The store's loader: adapter ``folder`` into the shared model as a new slot; its bytes are its factors'."""
        slot = f"{name.replace('.', '_')}__{next(self._ids)}"  # adapter names in a model: letters, digits, _ -
        with self.lock:  # between waves
            load_adapter(self.model, folder, slot)
            set_adapter(self.model, [])  # mixed_batch chooses per row; nothing is active outside it
            nbytes = 0
            for _, layer in lora_layers(self.model):
                if slot in layer.lora:
                    nbytes += sum(
                        p.numel() * p.element_size() for p in cast(LoraAdapter, layer.lora[slot]).parameters()
                    )
        return slot, nbytes

    def unload(self, slot: str) -> None:
        with self.lock:
            delete_adapter(self.model, slot)

    def prompt_ids(self, payload: dict[str, Any], chat: bool) -> list[int]:
        """The prompt's token ids: ``prompt`` (a string) or ``messages`` (the tokenizer's chat template, or
        ``role: content`` lines ending in ``assistant:`` when it has none).

        Raises:
            BadRequestError: a missing or malformed prompt or messages.
        """
        tok: Any = self.tokenizer  # transformers' tokenizer methods are loosely typed
        text: Any
        if chat:
            messages: Any = payload.get("messages")
            ok = isinstance(messages, list) and bool(messages)
            ok = ok and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            if not ok:
                raise BadRequestError('"messages": expected a non-empty list of {"role": ..., "content": "..."}')
            if getattr(tok, "chat_template", None):
                out: Any = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return [int(i) for i in (out["input_ids"] if isinstance(out, dict) else out)]
            text = "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages) + "assistant:"
        else:
            text = payload.get("prompt")
            if not isinstance(text, str) or not text:
                raise BadRequestError(f'"prompt": expected a non-empty string, got {text!r}')
        ids = [int(i) for i in tok(text)["input_ids"]]
        if not ids:
            raise BadRequestError("the prompt has no tokens")
        return ids

    def job(self, payload: dict[str, Any], chat: bool, stack: ExitStack) -> tuple[Job, Entry[str], list[int]]:
        """Check the request, hold its adapter (in ``stack``) and queue it.

        Raises:
            BadRequestError: bad fields. The store's errors (unknown adapter 404, ...).
        """
        name = payload.get("model")
        if not isinstance(name, str):
            raise BadRequestError(f'"model": expected the adapter name (one of {self.store.names()}), got {name!r}')
        prompt = self.prompt_ids(payload, chat)
        max_tokens = _int(payload, "max_tokens", 16, self.max_tokens)
        temperature = payload.get("temperature", 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 10:
            raise BadRequestError(f'"temperature": expected a number in [0, 10], got {temperature!r}')
        seed = payload.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequestError(f'"seed": expected an int, got {seed!r}')
        entry = stack.enter_context(self.store.use(name))
        job = Job(entry.value, prompt, max_tokens, float(temperature), seed)
        return self.batcher.submit(job), entry, prompt

    def tokens(self, job: Job) -> Iterator[int]:
        """The job's tokens as the batcher makes them.

        Raises:
            ServeError: the wave failed (the cause in the message).
        """
        while True:
            item = job.out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise ServeError(f"generation failed: {type(item).__name__}: {item}")
            yield item


def _chunk(kind: str, rid: str, model: str, entry: Entry[str], text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if kind == "chat":
        choice["delta"] = {"content": text} if text or finish is None else {}
    else:
        choice["text"] = text
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "adapter": entry.name, "adapter_version": entry.version}  # fmt: skip


def llm_server(service: LlmService, *, max_body: int) -> Server:
    """The HTTP server of an :class:`LlmService`: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
    plus ``/health``, ``/metrics``, ``/v1/adapters``. Stopping the server stops the batcher."""
    server = Server(service.store, title="lorakit serve llm", max_body=max_body)
    server.app.router.on_shutdown.append(lambda: service.batcher.stop())
    tok: Any = service.tokenizer

    async def models() -> dict[str, Any]:
        names = service.store.names()
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lorakit"} for n in names]}

    server.app.add_api_route("/v1/models", models, methods=["GET"])

    def endpoint(path: str, chat: bool) -> None:
        kind = "chat" if chat else "text"

        async def handle(request: Request) -> Response:
            start = time.perf_counter()
            stack = ExitStack()
            adapter, status = "", 500
            try:
                payload = await read_json(request, server.max_body)
                job, entry, prompt = await run_in_threadpool(service.job, payload, chat, stack)
            except ServeError as exc:
                stack.close()
                server.metrics.observe(path, "", exc.status, time.perf_counter() - start)
                return JSONResponse(error_body(exc), status_code=exc.status)
            adapter = entry.name
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            model = str(payload["model"])
            headers = adapter_headers(entry.name, entry.version)

            def collect() -> list[int]:
                return list(service.tokens(job))

            if not payload.get("stream"):
                try:
                    ids = await run_in_threadpool(collect)
                    status = 200
                except ServeError as exc:
                    status = exc.status
                    return JSONResponse(error_body(exc), status_code=status)
                finally:
                    stack.close()
                    server.metrics.observe(path, adapter, status, time.perf_counter() - start)
                text = tok.decode(ids, skip_special_tokens=True)
                choice: dict[str, Any] = {"index": 0, "finish_reason": job.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                body = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                        "created": int(time.time()), "model": model, "choices": [choice], "usage": usage,
                        "adapter": entry.name, "adapter_version": entry.version}  # fmt: skip
                return JSONResponse(body, headers=headers)

            async def events() -> AsyncIterator[str]:
                nonlocal status
                ids: list[int] = []
                sent = ""
                tokens = service.tokens(job)
                try:
                    while True:
                        token = await run_in_threadpool(next, tokens, None)
                        if token is None:
                            break
                        ids.append(token)
                        text = tok.decode(ids, skip_special_tokens=True)
                        if text != sent:  # a token may complete a character only with the next one
                            yield f"data: {json.dumps(_chunk(kind, rid, model, entry, text[len(sent) :], None))}\n\n"
                            sent = text
                    yield f"data: {json.dumps(_chunk(kind, rid, model, entry, '', job.finish_reason))}\n\n"
                    yield "data: [DONE]\n\n"
                    status = 200
                except ServeError as exc:
                    status = exc.status
                    yield f"data: {json.dumps(error_body(exc))}\n\n"
                finally:
                    stack.close()
                    server.metrics.observe(path, adapter, status, time.perf_counter() - start)

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        server.app.add_api_route(path, handle, methods=["POST"])

    endpoint("/v1/completions", chat=False)
    endpoint("/v1/chat/completions", chat=True)
    return server
