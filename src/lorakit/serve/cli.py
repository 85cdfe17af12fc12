"""``lorakit serve yolo|llm key=value ...``: the adapter servers.

lorakit serve yolo model=base.pt adapters=DIR [port=8000] [host=127.0.0.1] ...
lorakit serve llm  model=MODEL_DIR adapters=DIR [port=8000] [host=127.0.0.1] ...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cli.args import ArgError, did_you_mean, parse_args, wants_help
from ..errors import require_extra

USAGE = """usage: lorakit serve yolo|llm key=value ...

  yolo   detections from one base detector, the adapter chosen per request (POST /v1/detect)
         lorakit serve yolo model=base.pt adapters=DIR [port=8000] [host=127.0.0.1] [imgsz=640] [device=cpu]
  llm    OpenAI-compatible /v1/completions and /v1/chat/completions; "model" names the adapter
         lorakit serve llm model=MODEL_DIR adapters=DIR [port=8000] [host=127.0.0.1] [max_batch=16] [window_ms=5]

  common keys: budget_mb=1024 (memory for cached adapters)  pin=NAME,NAME (loaded at start, never evicted)
               max_body_mb=32 (413 beyond it)  graceful_s=30 (how long in-flight requests may finish on stop)
  adapters=DIR holds one adapter folder per name (DIR/NAME/adapter_config.json + adapter_model.safetensors);
  a folder saved again is reloaded on its next request. Endpoints also: GET /health, /metrics, /v1/adapters.
"""

COMMON = {"model", "adapters", "port", "host", "budget_mb", "pin", "max_body_mb", "graceful_s", "log_level"}
YOLO_KEYS = COMMON | {"imgsz", "device", "max_images"}
LLM_KEYS = COMMON | {"max_batch", "window_ms", "max_tokens", "dtype", "device"}


def _int(args: dict[str, Any], key: str, default: int, low: int = 1) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ArgError(f"{key}={value!r}: expected an int >= {low}")
    return value


def _number(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ArgError(f"{key}={value!r}: expected a number >= 0")
    return float(value)


def _common(args: dict[str, Any]) -> dict[str, Any]:
    for key in ("model", "adapters"):
        if key not in args:
            raise ArgError(f"{key}= is required")
    if not Path(str(args["adapters"])).is_dir():
        raise ArgError(f"adapters={args['adapters']!r}: no such folder (one adapter folder per name inside it)")
    pin = args.get("pin", [])
    pinned = tuple(str(p) for p in ([pin] if isinstance(pin, str) else pin))
    return {
        "host": str(args.get("host", "127.0.0.1")),
        "port": _int(args, "port", 8000, low=0),
        "budget": int(_number(args, "budget_mb", 1024) * 2**20),
        "pinned": pinned,
        "max_body": int(_number(args, "max_body_mb", 32) * 2**20),
        "graceful_s": _number(args, "graceful_s", 30),
        "log_level": str(args.get("log_level", "info")),
    }


def _yolo(argv: list[str]) -> int:
    args = parse_args(argv, YOLO_KEYS, "serve yolo")
    c = _common(args)
    from ..yolo import offline
    from ..yolo.cli_models import require_local

    require_local(str(args["model"]))
    offline.enable()  # before Ultralytics is imported: its import probes the network
    from .app import serve
    from .yolo import YoloService, yolo_server

    device = args.get("device")
    service = YoloService(
        str(args["model"]),
        str(args["adapters"]),
        budget_bytes=c["budget"],
        pinned=c["pinned"],
        imgsz=_int(args, "imgsz", 640, low=32),
        device=None if device is None else str(device),
        max_images=_int(args, "max_images", 16),
    )
    service.store.preload()
    server = yolo_server(service, max_body=c["max_body"])
    serve(server.app, c["host"], c["port"], graceful_s=c["graceful_s"], log_level=c["log_level"])
    return 0


def _llm(argv: list[str]) -> int:
    args = parse_args(argv, LLM_KEYS, "serve llm")
    c = _common(args)
    require_extra("transformers", "hf", "lorakit serve llm")
    from .app import serve
    from .llm import LlmService, llm_server

    service = LlmService(
        str(args["model"]),
        str(args["adapters"]),
        budget_bytes=c["budget"],
        pinned=c["pinned"],
        max_batch=_int(args, "max_batch", 16),
        window_s=_number(args, "window_ms", 5) / 1000,
        max_tokens=_int(args, "max_tokens", 256),
        dtype=str(args.get("dtype", "float32")),
        device=str(args.get("device", "cpu")),
    )
    service.store.preload()
    server = llm_server(service, max_body=c["max_body"])
    serve(server.app, c["host"], c["port"], graceful_s=c["graceful_s"], log_level=c["log_level"])
    return 0


def run(argv: list[str]) -> int:
    """Run ``lorakit serve yolo|llm key=value ...`` until stopped; returns the exit code
    (bad arguments raise ArgError/LoraError, which the ``lorakit`` entry prints on one line, exit 2)."""
    if not argv or wants_help(argv):
        print(USAGE)
        return 0 if argv else 2
    require_extra("fastapi", "serve", "lorakit serve")
    require_extra("uvicorn", "serve", "lorakit serve")
    verbs: dict[str, Callable[[list[str]], int]] = {"yolo": _yolo, "llm": _llm}
    verb = verbs.get(argv[0])
    if verb is None:
        raise ArgError(f"unknown serve subverb {argv[0]!r}{did_you_mean(argv[0], verbs, n=1)} (use yolo or llm)")
    return verb(argv[1:])
