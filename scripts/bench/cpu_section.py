"""Section 8 of docs/benchmarks.md: the CPU-time limit's overhead and kill accuracy (the data
of ``cpu_limit``'s two cases)."""

# ruff: noqa: RUF001 - the report is typeset: the multiplication sign is meant
from __future__ import annotations

import statistics
from typing import Any

from .cpu_limit import SPINNERS, percentile
from .figures import fmt, rounds_of, section


def _overhead_rows(data: dict[str, Any], label: Any) -> list[list[str]]:
    rows = []
    for tool in data["runs"].get("cpu_overhead", {}).get("rounds", {}):
        for found in rounds_of(data, "cpu_overhead", tool):
            if "ratio" not in found:
                rows.append([label(tool), "", "", found.get("error", "failed"), "", ""])
                continue
            plain = statistics.median(found["plain_per_task_ms"])
            limited = statistics.median(found["limited_per_task_ms"])
            spread = found["round_ratios"]
            rows.append([
                label(tool), str(found["n"]), str(found["rounds"]),
                f"{fmt(plain)} / {fmt(limited)}", f"{found['ratio']:.3f}×",
                f"{min(spread):.2f}–{max(spread):.2f}",
            ])  # fmt: skip
    return rows


def _kill_rows(data: dict[str, Any], label: Any) -> list[list[str]]:
    rows = []
    for tool in data["runs"].get("cpu_kill", {}).get("rounds", {}):
        for found in rounds_of(data, "cpu_kill", tool):
            for spinner in SPINNERS:
                for mechanism in ("tree", "RLIMIT_CPU alone"):
                    entry = found.get(f"{mechanism}: {spinner}")
                    if not entry or not entry["over_s"]:
                        continue
                    over = entry["over_s"]
                    rows.append([
                        label(tool), spinner, mechanism, f"{entry['classified']}/{entry['runs']}",
                        f"{fmt(percentile(over, 0.5), 3)} / {fmt(percentile(over, 0.99), 3)}",
                    ])  # fmt: skip
    return rows


def cpu_limit_section(data: dict[str, Any], label: Any) -> list[str]:
    """The heading, the two tables; nothing when neither case ran."""
    overhead, kills = _overhead_rows(data, label), _kill_rows(data, label)
    if not overhead and not kills:
        return []
    lines = section(
        "## 8. CPU-time limit: overhead and kill accuracy",
        "The same trivial tasks with and without `cpu_time_limit_seconds` (a budget no task"
        " reaches: only the mechanism is paid), in interleaved rounds in one interpreter; the"
        " ratio is of the medians (goal ≤ 1.02). On cgroup v1 with cpuacct mounted apart from"
        " cpu, the limit adds that hierarchy (mkdir, enter, rmdir) to every task; co-mounted"
        " (`cpu,cpuacct`) and on cgroup v2 (`cpu.stat` is always there) it adds no cgroup.",
        header=["tool", "tasks", "rounds", "per task ms without / with", "ratio", "spread"],
        rows=overhead,
    )
    lines += section(
        "### Kill accuracy",
        "Budget 1 s; CPU used beyond it by the result's `cpu_time_used_seconds` (the kernel's"
        " counter), p50 / p99 over the runs. *tree*: the scheduler's CPU deadline on the"
        " task's cgroup counter; *RLIMIT_CPU alone*: the check switched off (sandboxrun before"
        " issue 15), which rounds the budget up to whole seconds and lets forked children"
        " through.",
        header=["tool", "task", "mechanism", "classified", "beyond the budget s p50 / p99"],
        rows=kills,
    )
    return lines
