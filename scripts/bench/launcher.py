"""The launcher (issue 11): the zygote against the bare-fork launcher it replaced, from a small
manager and from a "server" manager (typer, rich and psutil imported, a 200 MiB heap of small
objects and buffers), side by side with Glasswall in the same rounds.

Per task it reports the manager's CPU and the machine's (``/proc/stat``: every core, the kernel
included), so the worker side -- which under the zygote runs in the zygotes' children, not ours --
is the difference. A quiet machine is assumed for that split (the run waits for one).
"""

from __future__ import annotations

import os
import time
from typing import Any

from .tasks import trivial
from .tools import runner

Params = dict[str, Any]
Result = dict[str, Any]
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def server_heap(mib: int) -> list[Any]:
    """What a long-running server holds: libraries imported, many small objects, buffers."""
    import contextlib

    for name in ("typer", "rich.console", "psutil"):
        with contextlib.suppress(ImportError):
            __import__(name)
    heap: list[Any] = [bytearray(1 << 20) for _ in range(mib // 2)]  # half in 1 MiB buffers
    for buffer in heap:
        buffer[::4096] = b"x" * len(buffer[::4096])  # touched: resident, as a real heap is
    small = (mib // 2) * (1 << 20) // 200  # the rest in ~200-byte objects (dicts, strings)
    heap.append([{"id": i, "name": f"item-{i}"} for i in range(small)])
    return heap


def case_launch(tool: str, p: Params) -> Result:
    """``n`` trivial tasks, 2 workers, from a manager holding ``heap_mib`` of heap."""
    heap = server_heap(p["heap_mib"]) if p["heap_mib"] else None
    n = p["n"]
    run = runner(tool)
    usage = os.times()
    busy, start = _machine_busy_s(), time.perf_counter()
    outcomes = run([(trivial, (i,)) for i in range(n)])
    wall = time.perf_counter() - start
    machine = _machine_busy_s() - busy
    after = os.times()
    manager = after.user + after.system - usage.user - usage.system
    del heap
    return {
        "n": n,
        "heap_mib": p["heap_mib"],
        "ok": sum(1 for o in outcomes if o["success"]),
        "tasks_per_s": n / wall,
        "manager_cpu_ms": manager / n * 1000,
        "machine_cpu_ms": machine / n * 1000,
        "worker_side_cpu_ms": max(0.0, machine - manager) / n * 1000,
    }


LAUNCHER_CASES = {"launch": case_launch}
#: The tools of this comparison: the default (zygote), the launcher before it, the peer.
LAUNCHER_TOOLS = ("sandboxrun-cgroup_v1", "sandboxrun-fork", "glasswall")
