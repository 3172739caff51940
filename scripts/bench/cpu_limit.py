"""The CPU-time limit's two costs, sandboxrun only (issue 15): what the tree-wide check adds
to the trivial-task throughput, and how far past its budget a spinning task gets before the
kill, next to ``RLIMIT_CPU`` alone.

- ``cpu_overhead``: ``n`` trivial tasks with and without ``cpu_time_limit_seconds`` (a budget
  no task reaches, so only the mechanism is paid: on cgroup v1 the cpuacct hierarchy, on every
  backend the CPU deadline), in interleaved rounds within one interpreter (the order flips
  every round, so drift hits both alike); the figure is the ratio of the medians.
- ``cpu_kill``: a task spinning one process, and a task forking 3 children that spin 1.5 s
  each, under a budget of 1 s: the CPU used beyond it, by the result's ``cpu_time_used_seconds``
  (the kernel's counter). Once with the tree-wide check, once with RLIMIT_CPU alone (the
  check switched off in this interpreter, which is what sandboxrun did before issue 15).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

from .tasks import cpu_spinner, trivial

Params = dict[str, Any]
Result = dict[str, Any]
NO_REACH_SECONDS = 3600.0  # a budget no trivial task gets near
SPINNERS = {"one process": (0, 3.0), "3 forked children": (3, 1.5)}


def _backend(tool: str) -> str:
    if not tool.startswith("sandboxrun-"):
        raise ValueError(f"{tool}: the CPU-limit cases measure sandboxrun only")
    return tool.split("-", 1)[1]


def _batch(backend: str, n: int, cpu_limit: float | None) -> float:
    from sandboxrun import ProcessManager, Task

    manager = ProcessManager(2, backend=backend, start_method="fork",  # type: ignore[arg-type]
                             cpu_time_limit_seconds=cpu_limit, isolation="none")  # fmt: skip
    start = time.perf_counter()
    with manager:
        for i in range(n):
            manager.queue_task(Task(trivial, (i,)))
    wall = time.perf_counter() - start
    if not all(result.success for result in manager.task_results):
        raise RuntimeError("a trivial task failed")
    return wall


def case_cpu_overhead(tool: str, p: Params) -> Result:
    backend, n = _backend(tool), p["n"]
    plain: list[float] = []
    limited: list[float] = []
    _batch(backend, min(n, 10), None)  # warm-up: first-use costs belong to neither side
    for round_number in range(p["rounds"]):
        order = [(plain, None), (limited, NO_REACH_SECONDS)]
        for walls, limit in order if round_number % 2 == 0 else reversed(order):
            walls.append(_batch(backend, n, limit))
    return {
        "n": n,
        "rounds": p["rounds"],
        "plain_per_task_ms": [wall / n * 1000 for wall in plain],
        "limited_per_task_ms": [wall / n * 1000 for wall in limited],
        "ratio": statistics.median(limited) / statistics.median(plain),
        "round_ratios": [b / a for a, b in zip(plain, limited, strict=True)],
    }


@contextlib.contextmanager
def _rlimit_only() -> Iterator[None]:
    """Switch the tree-wide check off: the worker's RLIMIT_CPU is all that is left."""
    from sandboxrun._cpu_budget import CpuBudget

    original = CpuBudget.first_deadline
    CpuBudget.first_deadline = lambda self, now: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        CpuBudget.first_deadline = original  # type: ignore[method-assign]


def _overshoots(backend: str, children: int, seconds: float, runs: int) -> Result:
    from sandboxrun import ProcessManager, Task

    over: list[float] = []
    flagged = 0
    for _ in range(runs):
        with ProcessManager(1, 60, backend=backend, start_method="fork",  # type: ignore[arg-type]
                            cpu_time_limit_seconds=1, isolation="none") as manager:  # fmt: skip
            manager.queue_task(Task(cpu_spinner, (children, seconds)))
        result = manager.task_results[0]
        flagged += result.cpu_time_limit_exceeded
        if result.cpu_time_used_seconds is not None:
            over.append(result.cpu_time_used_seconds - 1.0)
    return {"over_s": over, "classified": flagged, "runs": runs}


def case_cpu_kill(tool: str, p: Params) -> Result:
    backend, runs = _backend(tool), p["runs"]
    found: Result = {"budget_s": 1.0}
    for name, (children, seconds) in SPINNERS.items():
        found[f"tree: {name}"] = _overshoots(backend, children, seconds, runs)
        with _rlimit_only():
            found[f"RLIMIT_CPU alone: {name}"] = _overshoots(backend, children, seconds, runs)
    return found


def percentile(found: list[float], fraction: float) -> float:
    ordered = sorted(found)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


CPU_CASES = {"cpu_overhead": case_cpu_overhead, "cpu_kill": case_cpu_kill}
