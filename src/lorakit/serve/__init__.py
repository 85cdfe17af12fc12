"""Serving many adapters from one base over HTTP: ``lorakit serve yolo|llm`` (extra ``serve``).

* :mod:`.store`: adapters by name from one folder, an LRU with a memory budget, pinning and
  atomic reload of changed files; every answer names the adapter and its content version.
* :mod:`.app`: the HTTP shell (FastAPI + uvicorn): limits, error answers, ``/health``, ``/metrics``.
* :mod:`.yolo`: ``/v1/detect``, one merged, fused detector per cached adapter.
* :mod:`.llm`: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``, requests for
  different adapters batched into one forward (:func:`lorakit.mixed_batch`).

Importing this package imports neither FastAPI nor a model library; its modules do.
"""

from .errors import (
    AdapterLoadError,
    AdapterNameError,
    BadRequestError,
    CacheFullError,
    PayloadTooLargeError,
    ServeError,
    UnknownAdapterError,
)
from .store import AdapterStore, Entry, content_version

__all__ = [
    "AdapterLoadError",
    "AdapterNameError",
    "AdapterStore",
    "BadRequestError",
    "CacheFullError",
    "Entry",
    "PayloadTooLargeError",
    "ServeError",
    "UnknownAdapterError",
    "content_version",
]
