"""Section 10 of docs/benchmarks.md: the per-task cost of the isolation profiles (the data of
``isolation``'s case)."""

from __future__ import annotations

from typing import Any

from .figures import fmt, rounds_of, section, tri
from .isolation import PROFILES


def _rows(found: dict[str, Any], label: str) -> list[list[str]]:
    none_rate = found["none_tasks_per_s_median"]
    none_cpu = found["none_worker_side_cpu_ms_median"]
    rows = []
    for name in PROFILES:
        rate = found[f"{name}_tasks_per_s_median"]
        cpu = found[f"{name}_worker_side_cpu_ms_median"]
        # Two workers: one task's wall cost on its core is 2 / rate; what the profile adds to it.
        added = 2000 / rate - 2000 / none_rate
        rows.append([
            label, f"`{name}`", tri(found[f"{name}_tasks_per_s"], 0),
            "" if name == "none" else fmt(added, 2),
            tri(found[f"{name}_worker_side_cpu_ms"], 2),
            "" if name == "none" else fmt(cpu - none_cpu, 2),
            tri(found[f"{name}_manager_cpu_ms"], 2),
        ])  # fmt: skip
    return rows


def isolation_section(data: dict[str, Any], label: Any) -> list[str]:
    rows: list[list[str]] = []
    loads = []
    for tool in data["runs"].get("isolation", {}).get("rounds", {}):
        for found in rounds_of(data, "isolation", tool):
            if "none_tasks_per_s_median" not in found:
                rows.append([label(tool), "", found.get("error", "failed"), "", "", "", ""])
                continue
            rows += _rows(found, label(tool))
            loads.append(" → ".join(f"{x:.2f}" for x in found["load"]))
            counted = found.get("cpu_counted", "machine (/proc/stat)")
            n, rounds = found["n"], found["rounds"]
    if not rows:
        return []
    what = f"{n} trivial tasks per batch, {rounds} rounds" if loads else "no data"
    return section(
        "## 10. What isolation costs a task",
        f"{what}: one batch per profile per round, interleaved (the order turns every round),"
        " in one interpreter, the default launcher (the zygote), 2 workers; each batch a fresh"
        " manager, its first results (the zygotes' start) left out. *ms added*: the wall time"
        " one task holds a core (2 ÷ tasks/s, two workers) minus that of `none` (medians)."
        f" Worker-side CPU = the busy CPU of {counted if loads else 'n/a'} minus the manager's,"
        " per task (a machine-wide figure is inflated by other work, a cpuacct one is not);"
        f" 1-minute load average at the case's start → end: {', '.join(loads) or 'n/a'}.",
        header=["tool", "isolation", "tasks/s", "ms added per task (wall, one core)",
                "worker-side CPU ms/task", "CPU ms added", "manager CPU ms/task"],
        rows=rows,
    )  # fmt: skip
