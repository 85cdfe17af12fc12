"""The language-model server's batcher: requests for different adapters decoded together.

One thread owns the forwards. It takes the first waiting request, waits ``window_s`` for more
(up to ``max_batch``), and decodes that wave in one batch: the prompts left-padded to one length,
one adapter per row through :func:`lorakit.mixed_batch`, a KV cache (one prefill forward, then one
forward per new token for the whole wave). Each row stops at its own end-of-sequence token or token
limit; its tokens reach its request as they are made (streaming). Requests that arrive during a
wave wait for the next one. Rows are greedy unless the request gives ``temperature > 0``.

Left padding with an attention mask and position ids counted from each row's first real token
gives every row the logits it would get alone, up to float rounding (the padded keys are masked
out; the per-row LoRA delta is exact), so a greedy answer equals the same prompt generated alone.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..mixed import mixed_batch


@dataclass(eq=False)
class Job:
    """One request: its prompt tokens, the adapter slot (a name loaded in the model), limits, and where
    its tokens go (``None`` after the last one; an exception instead if the wave failed)."""

    slot: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    out: queue.Queue[int | None | BaseException] = field(default_factory=queue.Queue)
    finish_reason: str = "length"


class Batcher:
    """The decoding thread (module docstring). ``model_lock`` is held for each wave; the adapter store takes
    it to load or delete an adapter between waves."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos: set[int],
        pad: int,
        model_lock: threading.RLock,
        max_batch: int,
        window_s: float,
    ) -> None:
        self.model = model
        self.eos = eos
        self.pad = pad
        self.model_lock = model_lock
        self.max_batch = max_batch
        self.window_s = window_s
        # transformers 5 renamed the KV cache argument and output ``past_key_values`` -> ``cache``
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.waves = 0
        self.rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorakit-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the wave in progress, then stop (the jobs still waiting get an error)."""
        self._stop.set()
        self._thread.join(timeout)
        while not self.waiting.empty():
            self.waiting.get().out.put(RuntimeError("the server is shutting down"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            wave = [first]
            deadline = time.monotonic() + self.window_s
            while len(wave) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    wave.append(self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                self._decode(wave)
            except BaseException as exc:  # the wave's requests fail; the server goes on
                for job in wave:
                    job.out.put(exc)

    def _decode(self, wave: list[Job]) -> None:
        n = len(wave)
        length = max(len(j.prompt) for j in wave)
        device = next(self.model.parameters()).device
        ids = torch.full((n, length), self.pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for row, job in enumerate(wave):
            ids[row, length - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, length - len(job.prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        made = [0] * n
        done = [False] * n
        gens = [torch.Generator().manual_seed(j.seed) if j.seed is not None else None for j in wave]
        self.waves += 1
        self.rows += n
        with self.model_lock, torch.inference_mode(), mixed_batch(self.model, [j.slot for j in wave]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            last = positions[:, -1:]
            while True:
                logits = out.logits[:, -1, :].float()
                step = torch.empty(n, dtype=torch.long)
                for row, job in enumerate(wave):
                    step[row] = self._pick(logits[row], job, gens[row])
                    if done[row]:
                        continue
                    token = int(step[row])
                    if token in self.eos:
                        job.finish_reason, done[row] = "stop", True
                        job.out.put(None)
                        continue
                    job.out.put(token)
                    made[row] += 1
                    if made[row] >= job.max_tokens:
                        done[row] = True
                        job.out.put(None)
                if all(done):
                    return
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                last = last + 1
                out = self.model(
                    input_ids=step[:, None].to(device),
                    attention_mask=mask,
                    position_ids=last,
                    use_cache=True,
                    **{self.cache_key: out[self.cache_key]},
                )

    @staticmethod
    def _pick(logits: torch.Tensor, job: Job, gen: torch.Generator | None) -> int:
        if job.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.cpu() / job.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def stats(self) -> dict[str, Any]:
        return {"waves": self.waves, "rows": self.rows, "waiting": self.waiting.qsize()}
