"""The physical floor on this kernel: what a fresh process per task costs with no manager.

Deliberately does not import sandboxrun (it measures the kernel, not our code), so the few
cgroupfs steps it needs (finding its own v1 cgroups, a retrying rmdir) are written here.
Directories are made only below this process's own cgroups, and every one made is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

V1_CONTROLLERS = ("memory", "pids", "freezer", "cpu", "cpuacct")


def floor_fork(p: dict[str, Any]) -> dict[str, Any]:
    n = p["n"]
    start = time.perf_counter()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    wall = time.perf_counter() - start
    return {"n": n, "per_task_ms": wall / n * 1000}


def v1_own_dirs() -> dict[str, Path]:
    """{controller: this process's own cgroup directory} for the v1 hierarchies mounted."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        tail = right.split()
        if len(tail) < 3 or tail[0] != "cgroup":
            continue
        point = Path(left.split()[4])
        for controller in set(tail[2].split(",")) & set(V1_CONTROLLERS):
            if controller in own and controller not in found:
                found[controller] = point / own[controller].lstrip("/")
    return found


def _rmdir(path: Path) -> None:
    """rmdir, retrying while the kernel still counts the exited child (EBUSY)."""
    for attempt in range(500):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == 499:
                raise
            time.sleep(0.001)


def _mkdirs(dirs: list[Path], made: list[Path]) -> None:
    for d in dirs:
        d.mkdir()
        made.append(d)


def _rmdirs(dirs: list[Path], made: list[Path]) -> None:
    for d in dirs:
        _rmdir(d)
        made.remove(d)


def _fork_into(dirs: list[Path]) -> int:
    """Fork a child that writes 0 to each ``cgroup.procs`` and exits; its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        for d in dirs:
            try:
                fd = os.open(d / "cgroup.procs", os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)
            except OSError:
                code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def floor_cgroup_v1(p: dict[str, Any]) -> dict[str, Any]:
    """Per task: mkdir in each v1 hierarchy, a forked child writes 0 to each cgroup.procs and
    exits, rmdir. Only below this process's own cgroups, and every directory made is removed."""
    own = v1_own_dirs()
    missing = [c for c in V1_CONTROLLERS if c not in own]
    if "memory" in missing:
        return {"unavailable": "no cgroup v1 memory hierarchy mounted"}
    name = f"sbbench-{os.getpid()}-{os.urandom(3).hex()}"
    parents = list(dict.fromkeys(own[c] / name for c in V1_CONTROLLERS if c in own))
    made: list[Path] = []
    timings: dict[str, list[float]] = {"mkdir": [], "enter": [], "rmdir": []}
    idle: list[float] = []
    try:
        _mkdirs(parents, made)
        for i in range(p["n"]):
            dirs = [parent / f"t{i}" for parent in parents]
            t0 = time.perf_counter()
            _mkdirs(dirs, made)
            t1 = time.perf_counter()
            if _fork_into(dirs) != 0:
                raise RuntimeError("the child could not enter its cgroups")
            t2 = time.perf_counter()
            _rmdirs(dirs, made)
            t3 = time.perf_counter()
            timings["mkdir"].append(t1 - t0)
            timings["enter"].append(t2 - t1)
            timings["rmdir"].append(t3 - t2)
        # The same fork + enter after the machine's cgroups sat idle for a moment: the first
        # migration then waits for an RCU grace period (cgroup_threadgroup_rwsem).
        for i in range(p.get("idle_n", 0)):
            dirs = [parent / f"idle{i}" for parent in parents]
            _mkdirs(dirs, made)
            time.sleep(p["idle_s"])
            t1 = time.perf_counter()
            _fork_into(dirs)
            idle.append((time.perf_counter() - t1) * 1000)
            _rmdirs(dirs, made)
    except OSError as error:
        return {"unavailable": f"cannot manage cgroups here: {error}"}
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                _rmdir(d)
    ms = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    return {
        "n": p["n"],
        "controllers": [c for c in V1_CONTROLLERS if c in own],
        "missing": missing,
        "mkdir_ms": ms["mkdir"],
        "fork_enter_exit_ms": ms["enter"],
        "rmdir_ms": ms["rmdir"],
        "total_ms": sum(ms.values()),
        "idle_enter_ms": statistics.median(idle) if idle else None,
        "idle_s": p.get("idle_s"),
        "p90_total_ms": sorted(map(sum, zip(*timings.values(), strict=True)))[int(p["n"] * 0.9)]
        * 1000,
    }


FLOORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "fork": floor_fork,
    "cgroup_v1": floor_cgroup_v1,
}
