"""The two PNGs of the report (matplotlib, optional): throughput per tool against the floor,
and the allocator's memory over time under the limit."""

# ruff: noqa: RUF001 - the titles are typeset: the en dash and multiplication sign are meant
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from . import MIB
from .figures import floor_values, values
from .tools import LABELS, SHORT

FLOOR_BARS = {  # floor name: (field, bar label)
    "fork": ("per_task_ms", "floor:\nbare fork"),
    "cgroup_v1": ("total_ms", "floor: fork +\ncgroup v1 ops"),
}


def plots(data: dict[str, Any], out: Path) -> str | None:
    """The two PNGs; None when done, else why they were skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _throughput(plt, data, out / "bench-throughput.png")
    _memory(plt, data, out / "bench-memory-limit.png")
    return None


def _throughput(plt: Any, data: dict[str, Any], path: Path) -> None:
    bars: list[tuple[str, list[float], str]] = []  # (name, tasks/s of every round, colour)
    for tool in LABELS:
        rates = values(data, "throughput", tool, "tasks_per_s")
        if rates:
            colour = "tab:green" if tool.startswith("sandboxrun") else "tab:grey"
            bars.append((SHORT[tool], rates, colour))
    for name, (field, label) in FLOOR_BARS.items():
        rates = [1000 / x for x in floor_values(data, name, field)]
        if rates:
            bars.append((label, rates, "tab:blue"))
    meds = [statistics.median(rates) for _, rates, _ in bars]
    errors = [[m - min(r) for m, (_, r, _) in zip(meds, bars, strict=True)],
              [max(r) - m for m, (_, r, _) in zip(meds, bars, strict=True)]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = ax.bar(range(len(bars)), meds, yerr=errors, color=[c for *_, c in bars], capsize=4)
    ax.set_yscale("log")
    ax.set_xticks(range(len(bars)), [name for name, *_ in bars], fontsize=8)
    ax.set_ylabel("tasks per second (log scale)")
    ax.set_title("Trivial tasks, fresh process per task, 2 workers (median, min–max)")
    for bar, value in zip(drawn, meds, strict=True):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory(plt: Any, data: dict[str, Any], path: Path) -> None:
    strict = data["runs"].get("strict", {})
    fig, ax = plt.subplots(figsize=(9, 5))
    for tool, rounds in strict.get("rounds", {}).items():
        lines = [r for r in rounds if r.get("timeline")]
        if not lines:
            continue
        # The round with the median peak stands for the tool.
        chosen = sorted(lines, key=lambda r: r["peak_alloc_mib"])[len(lines) // 2]
        xs = [t[0] for t in chosen["timeline"]]
        ys = [t[1] for t in chosen["timeline"]]
        (line,) = ax.plot(xs, ys, marker=".", label=SHORT[tool].replace("\n", " "))
        if not chosen.get("completed"):
            ax.plot(xs[-1:], ys[-1:], marker="x", markersize=12, color=line.get_color())
    limit = strict.get("params", {}).get("limit", 256 * MIB) / MIB
    ax.axhline(limit, color="red", linestyle="--", label=f"limit {limit:.0f} MiB")
    ax.set_xlabel("ms since the task started")
    ax.set_ylabel("MiB allocated by the task (logged after each 64 MiB step)")
    ax.set_title("Fast allocator under a memory limit (× = last step logged before the kill)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
