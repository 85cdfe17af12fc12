"""A comparison's table, its verdicts in words, and its plot: from rows of numbers, for any integration.

Rows are dicts (one per strategy); :class:`Column` says how one key is shown,
:class:`Axis` which way is better. :func:`verdicts` names the winner of each axis
from the numbers, and the strategies no other beats on both accuracy and bytes
stored (the trade-off the plot shows). :func:`write_report` lays them out as every
integration's report does and writes ``results.json``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io_format import atomic_path, atomic_write


def fmt_bytes(n: float) -> str:
    """``5_300_000`` -> ``"5.05 MB"`` (MiB), ``120_000`` -> ``"117 KB"`` (KiB), ``300`` -> ``"300 B"``
    (a small head's file would show as "0 KB")."""
    if n < 2**10:
        return f"{n:.0f} B"
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def fmt_float(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def fmt_int(v: Any) -> str:
    return f"{v:,}"


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header, how a value is shown (``None`` shows as ``n/a``)."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str


@dataclass(frozen=True)
class Axis:
    """A quantity a strategy can win on: ``better`` is ``"max"`` or ``"min"``."""

    key: str
    label: str
    better: str
    fmt: Callable[[Any], str] = str


def cost_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """The columns every comparison shows after its accuracy ones: what a strategy costs
    (trainable parameters and their share, bytes stored per task, s/epoch, peak memory, headed
    with the memory measures its rows used)."""
    kinds = sorted({str(r["memory"]) for r in rows})
    return [
        Column("trainable", "trainable params", fmt_int),
        Column("trainable_fraction", "trainable %", lambda v: f"{v:.1%}"),
        Column("stored_bytes", "stored per task", fmt_bytes),
        Column("epoch_s", "s / epoch", fmt_float(2)),
        Column("peak_mem_mib", f"{' / '.join(kinds)} (MiB)", fmt_float(0)),
    ]


# The cost axes every comparison's verdicts name (BYTES is also the plot's cost axis).
TRAINABLE = Axis("trainable", "Fewest trainable parameters", "min", fmt_int)
BYTES = Axis("stored_bytes", "Smallest per task (bytes stored)", "min", fmt_bytes)
SPEED = Axis("epoch_s", "Fastest (s / epoch)", "min", lambda v: f"{v:.2f} s")
MEMORY = Axis("peak_mem_mib", "Least peak memory", "min", lambda v: f"{v:.0f} MiB")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table of ``rows``, numbers right-aligned."""

    def cell(row: dict[str, Any], c: Column) -> str:
        v = row.get(c.key)
        return "n/a" if v is None else c.fmt(v)

    numeric = [any(isinstance(r.get(c.key), (int, float)) for r in rows) for c in columns]
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ranked(rows: Sequence[dict[str, Any]], axis: Axis, name: str) -> list[tuple[Any, str]]:
    have = [(r[axis.key], r[name]) for r in rows if r.get(axis.key) is not None]
    return sorted(have, key=lambda t: t[0], reverse=axis.better == "max")


def verdicts(rows: Sequence[dict[str, Any]], axes: Sequence[Axis], name: str = "strategy") -> list[str]:
    """One sentence per axis: who wins (ties named together) and by how much over the runner-up.

    Computed from the rows only; an axis no row has a value for is left out.
    """
    out = []
    for axis in axes:
        ranked = _ranked(rows, axis, name)
        if not ranked:
            continue
        best = ranked[0][0]
        winners = [n for v, n in ranked if v == best]
        rest = [(v, n) for v, n in ranked if v != best]
        if not rest and len(ranked) > 1:
            out.append(f"{axis.label}: all {len(ranked)} tie ({axis.fmt(best)}).")
            continue
        text = f"{axis.label}: {' and '.join(winners)} ({axis.fmt(best)})"
        if rest:
            text += f", then {rest[0][1]} ({axis.fmt(rest[0][0])})"
        out.append(text + ".")
    return out


def pareto(rows: Sequence[dict[str, Any]], gain: Axis, cost: Axis, name: str = "strategy") -> list[str]:
    """The strategies no other beats on both axes (as good on both and better on one), cheapest first."""
    have = [r for r in rows if r.get(gain.key) is not None and r.get(cost.key) is not None]

    def better(a: Any, b: Any, axis: Axis) -> bool:
        return bool(a > b) if axis.better == "max" else bool(a < b)

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ga, gb, ca, cb = a[gain.key], b[gain.key], a[cost.key], b[cost.key]
        return (ga == gb or better(ga, gb, gain)) and (ca == cb or better(ca, cb, cost)) and (ga, ca) != (gb, cb)

    front = [r for r in have if not any(beats(o, r) for o in have)]
    front.sort(key=lambda r: r[cost.key], reverse=cost.better == "max")
    return [str(r[name]) for r in front]


def plot(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    x: str,
    ys: Sequence[tuple[str, str]],
    label: str,
    title: str,
    xlabel: str,
) -> None:
    """One panel per ``ys`` entry (``(key, y label)``): that key against ``x`` (log scale), each point
    labelled with its row's ``label``; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ys), figsize=(6.5 * len(ys), 4.6), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], ys, strict=True):
        pts = [(r[x], r[key], str(r[label])) for r in rows if r.get(x) and r.get(key) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for px, py, text in pts:
            ax.annotate(text, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@dataclass(frozen=True)
class Comparison:
    """A finished comparison: ``rows`` (one dict per strategy, in the order run), ``base`` (the base
    model's size and measurements), the ``verdicts`` in words, the strategies on the
    accuracy-vs-bytes front (``pareto``), the ``markdown`` report and its ``folder``."""

    rows: list[dict[str, Any]]
    base: dict[str, Any]
    verdicts: list[str]
    pareto: list[str]
    markdown: str
    folder: Path


def epochs_text(n: int) -> str:
    """``1`` -> ``"1 epoch"``, ``3`` -> ``"3 epochs"``."""
    return f"{n} epoch{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Layout:
    """What one integration's report says around the numbers.

    ``title`` heads it; ``intro`` (the setup) precedes the table; ``notes`` follow it, line by line;
    ``columns`` are the table's, ``axes`` the verdicts', ``gain`` and ``cost`` the front's;
    ``ys`` the plot's panels (:func:`plot`), ``plot_title`` its title.
    """

    title: str
    intro: str
    columns: Sequence[Column]
    notes: Sequence[str]
    axes: Sequence[Axis]
    gain: Axis
    cost: Axis
    ys: Sequence[tuple[str, str]]
    plot_title: str


def write_report(
    folder: Path, settings: dict[str, Any], base: dict[str, Any], rows: list[dict[str, Any]], layout: Layout
) -> Comparison:
    """The Markdown report (title, setup, table, notes, each strategy's method, who wins where, the
    accuracy-vs-bytes front) and ``results.json``/``results.md``/``results.png`` in ``folder``,
    each written atomically. Rows need ``strategy`` and ``method``."""
    said = verdicts(rows, layout.axes)
    front = pareto(rows, layout.gain, layout.cost)
    lines = [f"# {layout.title}", "", layout.intro, "", markdown_table(rows, layout.columns), *layout.notes]
    lines += ["", "## Strategies", ""] + [f"- `{r['strategy']}`: {r['method']}" for r in rows]
    lines += ["", "## Who wins where", ""] + [f"- {v}" for v in said]
    lines += [
        "",
        "Accuracy vs bytes stored: no other strategy is both as accurate and as small as "
        + ", ".join(f"`{n}`" for n in front)
        + " (cheapest first).",
    ]
    markdown = "\n".join(lines) + "\n"
    payload = {"settings": settings, "base": base, "rows": rows, "verdicts": said, "pareto": front}
    atomic_write(folder / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write(folder / "results.md", markdown.encode())
    plot(
        rows,
        folder / "results.png",
        x=layout.cost.key,
        ys=layout.ys,
        label="strategy",
        title=layout.plot_title,
        xlabel="bytes stored per task (log scale)",
    )
    return Comparison(rows, base, said, front, markdown, folder)
