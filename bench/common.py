"""Shared benchmark plumbing: models, child processes, timing, tables, JSON and plots.

Method (see README "Benchmarks"): every configuration runs in a fresh child
interpreter with one thread, so peak RSS is its own; step times are medians
over timed steps after warm-up; ratios are only taken between configurations
measured in the same run. The parent also samples the machine's busy CPU time
around each child and subtracts the child's own, to flag foreign load.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.compare.measure import peak_rss_mib as peak_rss_mib  # one home: what compare and the demo report
from lorakit.machine import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def rss_mib() -> float:
    """Current resident set size in MiB (procfs)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    return sum(vals[:8]) - idle


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --child args`` in a fresh interpreter; return its last JSON line,
    plus ``foreign_load``: CPU-seconds used by other processes per wall-second."""
    hz = os.sysconf("SC_CLK_TCK")
    busy0, t0 = _busy_jiffies(), time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(script), "--child", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (_busy_jiffies() - busy0) / hz
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1])
    result["foreign_load"] = round(max(0.0, busy - own) / wall, 3)
    return result


def timed_steps(step: Callable[[], dict[str, float]], warmup: int, steps: int) -> dict[str, Any]:
    """Run ``step`` (returning named phase times) warmup+steps times; medians and quartiles."""
    for _ in range(warmup):
        step()
    samples = [step() for _ in range(steps)]
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = sorted(s[key] for s in samples)
        out[key] = statistics.median(vals)
        if key == "step":
            q = statistics.quantiles(vals, n=4) if len(vals) > 1 else [vals[0]] * 3
            out["step_min"], out["step_q1"], out["step_q3"] = vals[0], q[0], q[2]
    return out


def saved_by_graph(roots: list[Any], exclude: set[int]) -> dict[int, int]:
    """Every tensor the autograd graph behind ``roots`` keeps for backward, by storage,
    skipping ``exclude`` (parameter/buffer storages): {storage data_ptr: nbytes}.

    Walks the graph and reads what each node holds (``_saved_*`` of built-in nodes,
    ``saved_tensors`` of custom Functions). It gives the same bytes as recording every
    save with ``torch.autograd.graph.saved_tensors_hooks`` (checked on the floor and PEFT:
    LLaMA 352.4 / 428.9 / 625.9 MiB both ways, MiniLM within 0.1 MiB), but runs no hook:
    an active hook changes what lorakit's fused Linear keeps (``lorakit.fused.rebuilt_from``).
    """
    import torch

    seen: dict[int, int] = {}
    visited: set[int] = set()

    def add(v: Any) -> None:
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in exclude and ptr != 0:
                    seen[ptr] = max(seen.get(ptr, 0), st.nbytes())

    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                add(getattr(fn, attr))
        if hasattr(fn, "saved_tensors"):  # a custom autograd.Function's node
            add(fn.saved_tensors)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return seen


def state_storages(model: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": 1,
    }
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("transformers", "peft", "ultralytics", "lorakit", "safetensors"):
        try:
            info[mod] = version(mod)  # no import: ultralytics would write settings files
        except PackageNotFoundError:
            info[mod] = None
    return info


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``cols`` = (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def bar_plot(name: str, groups: dict[str, dict[str, float]], ylabel: str, title: str) -> Path | None:
    """Grouped bars: {group (model): {series (config): value}}. Returns the PNG path, or None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(series) / 3), 4))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [g.get(s, 0.0) for g in groups.values()], width, label=s)
    labels = list(groups)
    long = max((len(x) for x in labels), default=0) > 12
    # long names (the adapters bench's) overlap unless slanted
    ticks = [j + 0.4 - width / 2 for j in range(len(groups))]
    ax.set_xticks(ticks, labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(
    name: str,
    args: Any,
    rows: list[dict[str, Any]],
    cols: list[tuple[str, str, str]],
    groups: dict[str, dict[str, float]],
    ylabel: str,
    title: str,
) -> str:
    """Print the Markdown table, write ``results/<name>.json`` and ``<name>.png``; return the table."""
    text = table(rows, cols)
    print("\n" + text)
    path = write_json(name, {"machine": machine(), "args": vars(args), "rows": rows, "table": text})
    plot = bar_plot(name, groups, ylabel, title)
    print(f"\nwrote {path}" + (f" and {plot}" if plot else ""))
    return text
