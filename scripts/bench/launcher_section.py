"""Section 9 of docs/benchmarks.md: the zygote launcher against the fork launcher and Glasswall,
from a small manager and from a 200 MiB "server" manager (the data of ``launcher``'s case)."""

# ruff: noqa: RUF001 - the report is typeset: the multiplication sign is meant
from __future__ import annotations

from typing import Any

from .figures import fmt, median_or_none, ratio, section, tri, values

KEYS = ("launch-small", "launch-server")


def _rows(data: dict[str, Any], label: Any) -> list[list[str]]:
    rows = []
    for key in KEYS:
        run = data["runs"].get(key)
        if not run:
            continue
        gpm = median_or_none(values(data, key, "glasswall", "tasks_per_s"))
        fork = median_or_none(values(data, key, "sandboxrun-fork", "tasks_per_s"))
        for tool in run["rounds"]:
            rate = values(data, key, tool, "tasks_per_s")
            rows.append([
                f"{run['params']['heap_mib']} MiB", label(tool), tri(rate),
                ratio(median_or_none(rate), gpm), ratio(median_or_none(rate), fork),
                tri(values(data, key, tool, "manager_cpu_ms"), 2),
                tri(values(data, key, tool, "worker_side_cpu_ms"), 2),
            ])  # fmt: skip
    return rows


def launcher_section(data: dict[str, Any], label: Any) -> list[str]:
    rows = _rows(data, label)
    if not rows:
        return []
    fork_floor = [r["per_task_ms"] for r in data["floor"].get("fork", []) if "per_task_ms" in r]
    floor = median_or_none(fork_floor)
    after = []
    if floor:
        after = [f"Floor in the same run: a bare fork + exit + waitpid, one at a time, takes"
                 f" {fmt(floor, 3)} ms ({fmt(1000 / floor)} /s on one core); two workers on two"
                 " cores could at best double that.", ""]  # fmt: skip
    return section(
        "## 9. The launcher: zygote vs fork, small manager vs server manager",
        "Trivial tasks, `max_workers=2`, cgroup_v1, in interleaved rounds with Glasswall. *server*:"
        " the manager first imports typer, rich and psutil and holds a heap of that size (half"
        " touched 1 MiB buffers, half ~200-byte objects), as a long-running server does. *fork*:"
        " `start_method=\"fork\"`, the launcher before the zygote (a task forked from the manager,"
        " entering five v1 hierarchies). *zygote* (the default): a fresh interpreter per slot,"
        " living in the slot's reused cgroups, forks each task into its own PID namespace."
        " Worker-side CPU = the machine's busy CPU (`/proc/stat`) minus the manager's, per task.",
        header=["heap", "tool", "tasks/s", "× Glasswall", "× fork launcher",
                "manager CPU ms/task", "worker-side CPU ms/task"],
        rows=rows,
        after=after,
    )  # fmt: skip
