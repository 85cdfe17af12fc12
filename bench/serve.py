"""Serving benchmark: ``lorakit serve`` against the naive way, by number of distinct adapters.

    OMP_NUM_THREADS=1 python bench/serve.py [--quick]

Detector (random-weight yolo26n, 2 classes, IMGSZ px images, one image per request, serial client):
  * plain: Ultralytics ``YOLO(base).predict`` on a decoded image (the cost a cached adapter should match);
  * served: ``YoloService.detect`` on cached adapters, the full request path minus the socket (base64 +
    PNG decode, predict on the adapter's merged fused copy, JSON-ready answer); requests cycle over
    1, 8 or 32 adapters;
  * http: the same requests through a real uvicorn server on 127.0.0.1 (httpx client);
  * naive: one ``LoraYOLO`` holding every adapter, ``set_adapter`` + ``predict`` per request (it re-merges
    after each switch).
Language model (random Llama, word-level tokenizer, PROMPT-token prompts, TOKENS new tokens, greedy):
  * served: CLIENTS requests at once, cycling over 1, 8 or 32 adapters, through ``LlmService``'s batcher
    (waves of up to 32 rows, mixed_batch, KV cache), in-process;
  * naive: one model holding every adapter, serial: ``set_adapter`` + ``generate`` (KV cache) per request.
Throughput is requests/s (detector) or generated tokens/s (LLM); latency p50/p99 per request.
Everything runs in this one process, one torch thread, in the same run. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMGSZ = 160
PROMPT, TOKENS = 16, 32


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _row(what: str, adapters: int, lat: list[float], wall: float, units: float, unit: str) -> dict[str, Any]:
    row = {"what": what, "adapters": adapters, "requests": len(lat), "throughput": units / wall, "unit": unit,
           "p50_ms": 1e3 * _pct(lat, 0.5), "p99_ms": 1e3 * _pct(lat, 0.99)}  # fmt: skip
    _say(f"{what}, {adapters} adapters: {row['throughput']:.1f} {unit}, p50 {row['p50_ms']:.1f} ms")
    return row


def _serial(n: int, call: Callable[[int], Any]) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ detector


def _detector_adapters(base_pt: Path, store: Path, count: int) -> None:
    """``count`` adapters as a LoRA run writes them (LoRA on the convs, BatchNorm and class convs trained
    fully), random B values; one injected model saved ``count`` times with new values."""
    import torch
    from ultralytics import YOLO

    import lorakit
    from lorakit.yolo.targets import class_convs
    from lorakit.yolo.trainer import LoraOptions, save_adapter

    model = YOLO(str(base_pt)).model.float()
    lorakit.inject(model, LoraOptions(r=8).build(model, class_convs(model)))
    bs = [p for n, p in model.named_parameters() if n.endswith(".B")]
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in bs:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.names = {0: f"a{i}", 1: f"b{i}"}
        save_adapter(model, store / f"d{i}", task="detect")


def bench_yolo(root: Path, counts: list[int], n: int) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from PIL import Image

    from lorakit.yolo import offline

    offline.enable(root / "ycfg")
    import httpx
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from lorakit.serve.app import in_thread
    from lorakit.serve.yolo import YoloService, yolo_server
    from lorakit.yolo import LoraYOLO

    torch.manual_seed(0)
    y = YOLO("yolo26n.yaml")
    y.model = DetectionModel("yolo26n.yaml", nc=2, verbose=False)
    base = root / "base.pt"
    y.save(base)
    store = root / "yolo_store"
    _detector_adapters(base, store, max(counts))
    _say("detector adapters written")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMGSZ, IMGSZ, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    pil = Image.open(io.BytesIO(png)).convert("RGB")
    args = {"imgsz": IMGSZ, "verbose": False, "save": False}

    plain = YOLO(str(base))
    for _ in range(5):
        plain.predict(pil, **args)
    lat, wall = _serial(n, lambda i: plain.predict(pil, **args))
    rows = [_row("detector plain Ultralytics predict", 0, lat, wall, len(lat), "req/s")]

    service = YoloService(base, store, budget_bytes=2**34, imgsz=IMGSZ)
    payloads = [{"adapter": f"d{i}", "images": [base64.b64encode(png).decode()]} for i in range(max(counts))]
    for p in payloads:
        service.detect(p)  # every adapter cached (a miss costs a load and a merge, measured apart below)
    _say("detector adapters cached in the service")
    t = time.perf_counter()
    service.load("x", store / "d0")
    miss_s = time.perf_counter() - t
    naive = LoraYOLO(str(base))
    for i in range(max(counts)):
        naive.load_adapter(store / f"d{i}", name=f"d{i}", activate=False)
    _say("detector adapters loaded in the naive LoraYOLO")
    server = yolo_server(service, max_body=2**24)
    # The 1.1x target compares a cached request with plain predict: time the two alternately, request by
    # request, so the shared machine's load falls on both alike (timed apart, they drifted 1.35x vs 1.08x).
    plain_lat: list[float] = []
    served_lat: list[float] = []
    t_plain = t_served = 0.0
    for i in range(n):
        t = time.perf_counter()
        plain.predict(pil, **args)
        plain_lat.append(time.perf_counter() - t)
        t_plain += plain_lat[-1]
        t = time.perf_counter()
        service.detect(payloads[i % 8])
        served_lat.append(time.perf_counter() - t)
        t_served += served_lat[-1]
    rows.append(_row("detector plain predict, interleaved", 0, plain_lat, t_plain, n, "req/s"))
    rows.append(_row("detector served (in-process), interleaved", 8, served_lat, t_served, n, "req/s"))
    with in_thread(server.app) as url, httpx.Client(timeout=60) as client:
        for k in counts:
            lat, wall = _serial(n, lambda i, k=k: service.detect(payloads[i % k]))
            rows.append(_row("detector served (in-process)", k, lat, wall, len(lat), "req/s"))
            lat, wall = _serial(
                n, lambda i, k=k: client.post(f"{url}/v1/detect", json=payloads[i % k]).raise_for_status()
            )
            rows.append(_row("detector served over HTTP", k, lat, wall, len(lat), "req/s"))

            def switch(i: int, k: int = k) -> None:
                naive.set_adapter(f"d{i % k}")
                naive.predict(pil, **args)

            switch(0)
            lat, wall = _serial(n, switch)
            rows.append(_row("detector naive (set_adapter + predict)", k, lat, wall, len(lat), "req/s"))
            _say(f"detector with {k} adapters measured")
    rows.append(_row("detector miss (load + merge + warm-up)", 1, [miss_s], miss_s, 1, "req/s"))
    return rows


# ------------------------------------------------------------------------------------------------ language model


def _llm_base(folder: Path, vocab: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *(f"w{i}" for i in range(vocab - 3))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")  # fmt: skip
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, vocab_size=vocab, max_position_embeddings=256,
                                   bos_token_id=2, eos_token_id=2, pad_token_id=0)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def bench_llm(root: Path, counts: list[int], clients: int) -> list[dict[str, Any]]:
    import torch
    import transformers

    import lorakit
    from lorakit.serve.llm import LlmService
    from lorakit.serve.llm_batch import Job

    base, store = root / "llm_base", root / "llm_store"
    _llm_base(base, vocab=512)
    for i in range(max(counts)):
        m = transformers.LlamaForCausalLM.from_pretrained(base)
        lorakit.inject(m, lorakit.LoraConfig(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(m):
                layer.lora["default"].B.normal_(0, 0.02, generator=gen)
        lorakit.save_adapter(m, store / f"l{i}")
    rng = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(t)}" for t in torch.randint(1, 500, (PROMPT,), generator=rng)) for _ in range(clients)]
    service = LlmService(base, store, budget_bytes=2**34, max_batch=32, window_s=0.01, max_tokens=TOKENS)
    for i in range(max(counts)):
        with service.store.use(f"l{i}"):
            pass
    naive = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    for i in range(max(counts)):
        lorakit.load_adapter(naive, store / f"l{i}", f"l{i}")
    tok = service.tokenizer
    rows = []
    for k in counts:
        lat: list[float] = [0.0] * clients
        made = [0] * clients

        def one(i: int, k: int = k, lat: list[float] = lat, made: list[int] = made) -> None:
            t = time.perf_counter()
            with service.store.use(f"l{i % k}") as entry:
                ids = [int(x) for x in tok(prompts[i])["input_ids"]]
                job = service.batcher.submit(Job(entry.value, ids, TOKENS))
                made[i] = len(list(service.tokens(job)))
            lat[i] = time.perf_counter() - t

        one(0)  # warm-up
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        rows.append(_row("llm served (batched waves)", k, lat, wall, sum(made), "tok/s"))

        def gen(i: int, k: int = k) -> int:
            lorakit.set_adapter(naive, f"l{i % k}")
            ids = tok(prompts[i], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = naive.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
            return int(out.shape[1] - ids.shape[1])

        gen(0)
        counts_made: list[int] = []
        lat2, wall2 = _serial(clients, lambda i, gen=gen, out=counts_made: out.append(gen(i)))
        rows.append(_row("llm naive (set_adapter + generate, serial)", k, lat2, wall2, sum(counts_made), "tok/s"))
        _say(f"llm with {k} adapters measured")
    service.batcher.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    a = ap.parse_args()
    common.one_thread()
    counts = [1, 8, 32]
    n, clients = (32, 32) if a.quick else (96, 32)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_llm(Path(tmp), counts, clients) + bench_yolo(Path(tmp), counts, n)
    print(common.table(rows, [("what", "path", ""), ("adapters", "adapters", ""), ("requests", "requests", ""),
                              ("throughput", "throughput", ".1f"), ("unit", "unit", ""), ("p50_ms", "p50 ms", ".1f"),
                              ("p99_ms", "p99 ms", ".1f")]))  # fmt: skip
    by = {(r["what"], r["adapters"]): r for r in rows}
    summary = {
        "llm_8_adapters_speedup_vs_naive": by[("llm served (batched waves)", 8)]["throughput"]
        / by[("llm naive (set_adapter + generate, serial)", 8)]["throughput"],
        "detector_cached_p50_vs_plain": by[("detector served (in-process), interleaved", 8)]["p50_ms"]
        / by[("detector plain predict, interleaved", 0)]["p50_ms"],
        "detector_http_p50_vs_plain": by[("detector served over HTTP", 8)]["p50_ms"]
        / by[("detector plain Ultralytics predict", 0)]["p50_ms"],
    }
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    common.write_json("serve", {"machine": common.machine(), "imgsz": IMGSZ, "prompt_tokens": PROMPT,
                                "new_tokens": TOKENS, "rows": rows, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
