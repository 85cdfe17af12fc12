"""Request counters and latency histograms, written as Prometheus text for ``/metrics``."""

from __future__ import annotations

import threading
from collections import defaultdict

from .store import StoreStats

# Latency bucket bounds in seconds (Prometheus' ``le``): from a cached detector request to a long generation.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Requests by endpoint, adapter and status; latency by endpoint. Thread-safe.

    ``adapter`` is the adapter that answered, or ``""`` when none did (a bad or unknown
    name), so a client cannot grow the label set with made-up names.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def observe(self, endpoint: str, adapter: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(endpoint, adapter, status)] += 1
            counts = self._buckets[endpoint]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self._sum[endpoint] += seconds
            self._count[endpoint] += 1

    def render(self, store: StoreStats) -> str:
        """The Prometheus text exposition (version 0.0.4) of these counters and the store's."""
        lines = [
            "# HELP lorakit_requests_total Requests answered, by endpoint, adapter and HTTP status.",
            "# TYPE lorakit_requests_total counter",
        ]
        with self._lock:
            for (endpoint, adapter, status), n in sorted(self._requests.items()):
                lines.append(
                    f'lorakit_requests_total{{endpoint="{_label(endpoint)}",adapter="{_label(adapter)}",'
                    f'status="{status}"}} {n}'
                )
            lines += [
                "# HELP lorakit_request_seconds Request latency in seconds, by endpoint.",
                "# TYPE lorakit_request_seconds histogram",
            ]
            for endpoint in sorted(self._count):
                ep = _label(endpoint)
                for bound, n in zip(BUCKETS, self._buckets[endpoint], strict=True):
                    lines.append(f'lorakit_request_seconds_bucket{{endpoint="{ep}",le="{bound}"}} {n}')
                lines.append(f'lorakit_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {self._count[endpoint]}')
                lines.append(f'lorakit_request_seconds_sum{{endpoint="{ep}"}} {self._sum[endpoint]}')
                lines.append(f'lorakit_request_seconds_count{{endpoint="{ep}"}} {self._count[endpoint]}')
        for name, help_text, value in (
            ("cache_hits_total", "Requests whose adapter was cached.", store.hits),
            ("cache_misses_total", "Requests that had to load their adapter.", store.misses),
            ("adapter_loads_total", "Adapter versions loaded.", store.loads),
            (
                "adapter_load_errors_total",
                "Adapter loads that failed (corrupt or unreadable files).",
                store.load_errors,
            ),
            ("cache_evictions_total", "Adapters evicted to stay within the memory budget.", store.evictions),
            ("adapter_reloads_total", "Cached adapters replaced by a changed file's new version.", store.reloads),
        ):
            lines += [f"# HELP lorakit_{name} {help_text}", f"# TYPE lorakit_{name} counter", f"lorakit_{name} {value}"]
        lines += [
            "# HELP lorakit_adapters_loaded Adapters in the cache.",
            "# TYPE lorakit_adapters_loaded gauge",
            f"lorakit_adapters_loaded {len(store.loaded)}",
            "# HELP lorakit_adapter_info The cached adapters and their versions (content sha256).",
            "# TYPE lorakit_adapter_info gauge",
            *(
                f'lorakit_adapter_info{{adapter="{_label(n)}",version="{v}"}} 1'
                for n, v in sorted(store.loaded.items())
            ),
            "# HELP lorakit_cache_bytes Bytes held by cached (and replaced but still in-use) adapters.",
            "# TYPE lorakit_cache_bytes gauge",
            f"lorakit_cache_bytes {store.bytes}",
            "# HELP lorakit_cache_budget_bytes The cache's memory budget.",
            "# TYPE lorakit_cache_budget_bytes gauge",
            f"lorakit_cache_budget_bytes {store.budget}",
        ]
        return "\n".join(lines) + "\n"
