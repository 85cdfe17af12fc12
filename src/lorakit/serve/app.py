"""The HTTP shell both servers share: body limits, error answers, ``/health``, ``/metrics``, uvicorn.

Every answer to a request that used an adapter carries its name and version in the JSON body
(``adapter``, ``adapter_version``) and in the headers ``X-Lorakit-Adapter`` and
``X-Lorakit-Adapter-Version``. Errors are answered as OpenAI's API does,
``{"error": {"message": ..., "type": ..., "code": status}}``, with the status of the
:class:`~lorakit.serve.errors.ServeError` raised (an unknown adapter's answer also lists
``available``). Model work runs in worker threads, so the event loop keeps answering
``/health`` and other adapters' requests meanwhile.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from .errors import BadRequestError, PayloadTooLargeError, ServeError, UnknownAdapterError
from .metrics import Metrics
from .store import AdapterStore

log = logging.getLogger("lorakit.serve")

# (JSON body, adapter name, adapter version) of a request that an adapter answered.
Answer = tuple[dict[str, Any], str, str]


def adapter_headers(name: str, version: str) -> dict[str, str]:
    return {"X-Lorakit-Adapter": name, "X-Lorakit-Adapter-Version": version}


def error_body(exc: ServeError) -> dict[str, Any]:
    err: dict[str, Any] = {"message": str(exc), "type": type(exc).__name__, "code": exc.status}
    if isinstance(exc, UnknownAdapterError):
        err["available"] = exc.available
    return {"error": err}


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, reading at most ``limit`` bytes.

    Raises:
        PayloadTooLargeError: a ``Content-Length`` or a body over ``limit`` (never read whole).
        BadRequestError: not UTF-8 JSON, or not a JSON object.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes; the limit is {limit} bytes (max_body_mb)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body over the limit of {limit} bytes (max_body_mb)")
        chunks.append(chunk)
    try:
        payload = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequestError(f"request body: expected a JSON object, got {type(payload).__name__}")
    return payload


class Server:
    """A FastAPI app over an adapter store, with ``/health`` and ``/metrics``; the servers add endpoints
    with :meth:`json_endpoint` (or their own routes, streaming ones)."""

    def __init__(self, store: AdapterStore[Any], *, title: str, max_body: int) -> None:
        self.store = store
        self.metrics = Metrics()
        self.max_body = max_body
        self.started = time.time()
        self.app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        self.app.add_api_route("/v1/adapters", self.adapters, methods=["GET"])

    async def health(self) -> dict[str, Any]:
        snap = self.store.snapshot()
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 3), "adapters_loaded": len(snap.loaded)}

    async def metrics_text(self) -> Response:
        return PlainTextResponse(self.metrics.render(self.store.snapshot()), media_type="text/plain; version=0.0.4")

    async def adapters(self) -> dict[str, Any]:
        snap = self.store.snapshot()
        return {"adapters": self.store.names(), "loaded": snap.loaded, "pinned": sorted(self.store.pinned)}

    def json_endpoint(self, path: str, work: Callable[[dict[str, Any]], Answer]) -> None:
        """POST ``path``: the JSON body goes to ``work`` in a worker thread; its answer goes back with the
        adapter headers; a :class:`ServeError` becomes its status and error body."""

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            adapter, status = "", 500
            try:
                payload = await read_json(request, self.max_body)
                body, adapter, version = await run_in_threadpool(work, payload)
                status = 200
                return JSONResponse(body, headers=adapter_headers(adapter, version))
            except ServeError as exc:
                status = exc.status
                return JSONResponse(error_body(exc), status_code=status)
            except Exception as exc:  # a bug or a model failure: this request fails, the server goes on
                log.exception("%s failed", path)
                err = ServeError(f"internal error: {type(exc).__name__}: {exc}")
                return JSONResponse(error_body(err), status_code=500)
            finally:
                self.metrics.observe(path, adapter, status, time.perf_counter() - start)

        self.app.add_api_route(path, endpoint, methods=["POST"])


def serve(app: FastAPI, host: str, port: int, *, graceful_s: float = 30.0, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM; then it stops accepting connections and lets the
    requests in flight finish (for at most ``graceful_s`` seconds) before it exits."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=round(graceful_s), log_level=log_level)
    uvicorn.Server(config).run()


@contextmanager
def in_thread(app: FastAPI, *, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a background thread; yields its base URL
    (``http://127.0.0.1:PORT``) and stops the server gracefully on exit (tests, benchmarks, notebooks).

    Raises:
        RuntimeError: the server did not start, or did not stop, within ``timeout`` seconds.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the port is ours before uvicorn runs: no race for a free port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=round(timeout)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout} s")
