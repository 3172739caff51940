"""What each isolation profile costs a trivial task (issue 12): ``isolation="none"``,
``"default"`` and ``"strict"`` side by side, sandboxrun only, same backend and launcher (the
default: the zygote), in interleaved batches within one interpreter (the order turns every
round, so drift hits all alike).

Per batch a fresh ``ProcessManager``; its first ``WARM`` results (the zygotes' start) are left
out: the clock and the CPU counters start when the ``WARM``-th result arrives and stop at the
last. Worker-side CPU: where this process may make a cpuacct cgroup v1 below its own, the
case runs in one (``sbbench-isolation-PID``, removed at the end) and every process it starts --
manager, zygotes, tasks: sandboxrun enters no cpuacct cgroup without a CPU limit -- is counted
exactly by ``cpuacct.usage``, whatever else runs on the machine; elsewhere the machine's busy
CPU (``/proc/stat``) is the fallback, inflated by other work (the load average is recorded).
The manager's own CPU is subtracted either way.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from .floor import v1_own_dirs
from .launcher import _machine_busy_s
from .tasks import trivial

Params = dict[str, Any]
Result = dict[str, Any]
PROFILES = ("none", "default", "strict")
WARM = 4  # results before the clock starts: the zygotes' start is not a task's cost


def _backend(tool: str) -> str:
    if not tool.startswith("sandboxrun-") or tool.count("-") != 1:
        raise ValueError(f"{tool}: the isolation case measures a sandboxrun backend only")
    return tool.split("-", 1)[1]


def _cpu_s() -> float:
    usage = os.times()
    return usage.user + usage.system


@contextlib.contextmanager
def _tree_cpu() -> Iterator[tuple[str, Callable[[], float]]]:
    """(what is counted, seconds of busy CPU so far): this process's tree in a cpuacct cgroup
    of its own, or the whole machine."""
    own = v1_own_dirs().get("cpuacct")
    group = own / f"sbbench-isolation-{os.getpid()}" if own else None
    try:
        if group is None:
            raise OSError("no cpuacct v1 hierarchy")
        group.mkdir()
        (group / "cgroup.procs").write_text("0")
    except OSError:
        yield "machine (/proc/stat)", _machine_busy_s
        return
    usage = group / "cpuacct.usage"
    try:
        yield "this tree (cpuacct.usage)", lambda: int(usage.read_text()) / 1e9
    finally:
        assert own is not None
        for _ in range(500):  # EBUSY while a process is inside or a task's exit is counted
            # Ours and what still lives of our children (multiprocessing's resource tracker
            # lives until this interpreter ends) back where they were, then the directory.
            for pid in ["0", *(group / "cgroup.procs").read_text().split()]:
                with contextlib.suppress(OSError):  # gone meanwhile
                    (own / "cgroup.procs").write_text(pid)
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.01)


def _batch(backend: str, isolation: str, n: int, busy: Callable[[], float]) -> dict[str, float]:
    from sandboxrun import ProcessManager, Task

    manager = ProcessManager(2, backend=backend, isolation=isolation)  # type: ignore[arg-type]
    marks: list[tuple[float, float, float]] = []  # (wall, manager CPU, machine busy) at WARM, end
    ok = 0
    with manager:
        for i in range(n):
            manager.queue_task(Task(trivial, (i,)))
        for done, result in enumerate(manager.as_completed(), 1):
            ok += bool(result.success)
            if done in (WARM, n):
                marks.append((time.perf_counter(), _cpu_s(), busy()))
    if ok != n or len(marks) != 2:
        raise RuntimeError(f"isolation={isolation!r}: {n - ok} of {n} trivial tasks failed")
    (wall0, cpu0, busy0), (wall1, cpu1, busy1) = marks
    counted = n - WARM
    return {
        "tasks_per_s": counted / (wall1 - wall0),
        "manager_cpu_ms": (cpu1 - cpu0) / counted * 1000,
        "worker_side_cpu_ms": max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / counted * 1000,
    }


def case_isolation(tool: str, p: Params) -> Result:
    backend, n = _backend(tool), max(p["n"], 2 * WARM)
    batches: dict[str, list[dict[str, float]]] = {name: [] for name in PROFILES}
    load_before = os.getloadavg()[0]
    with _tree_cpu() as (counted, busy):
        for round_number in range(p["rounds"]):
            order = PROFILES if round_number % 2 == 0 else tuple(reversed(PROFILES))
            for name in order:
                batches[name].append(_batch(backend, name, n, busy))
    result: Result = {"n": n, "rounds": p["rounds"], "cpu_counted": counted,
                      "load": [load_before, os.getloadavg()[0]]}  # fmt: skip
    for name, found in batches.items():
        for field in ("tasks_per_s", "manager_cpu_ms", "worker_side_cpu_ms"):
            result[f"{name}_{field}"] = [batch[field] for batch in found]
            result[f"{name}_{field}_median"] = statistics.median(result[f"{name}_{field}"])
    return result


ISOLATION_CASES = {"isolation": case_isolation}
