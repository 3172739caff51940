"""One measurement of one tool, in the measuring interpreter: each ``case_*`` takes the tool's
name and the case's parameters and returns one JSON-able dict (a round)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import GIB, MIB
from .cpu_limit import CPU_CASES
from .isolation import ISOLATION_CASES
from .launcher import LAUNCHER_CASES
from .scaleout import case_dask, case_executor
from .tasks import allocator, big_result, hostile, sleeper, toucher, trivial
from .tools import Run, runner

Params = dict[str, Any]
Result = dict[str, Any]


def _maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


class _CpuClock:
    """CPU of this process and of its reaped children, and wall time, over a ``with`` block."""

    def __enter__(self) -> _CpuClock:
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self._start
        self.parent = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - _cpu(self._self)
        self.children = _cpu(resource.getrusage(resource.RUSAGE_CHILDREN)) - _cpu(self._kids)


def case_tasks(tool: str, p: Params) -> Result:
    """Throughput and per-task cost: ``n`` trivial tasks, 2 workers, a fresh process each."""
    n = p["n"]
    run = runner(tool)
    with _CpuClock() as clock:
        outcomes = run([(trivial, (i,)) for i in range(n)])
    return {
        "n": n,
        "ok": sum(1 for o in outcomes if o["success"]),
        "wall_s": clock.wall,
        "tasks_per_s": n / clock.wall,
        "per_task_ms": clock.wall / n * 1000,
        "maxrss_mib": _maxrss_mib(),
        "parent_cpu_ms": clock.parent / n * 1000,
        # ProcessPoolExecutor's task processes are the forkserver's children, the zygote's
        # are the zygotes' (section 9 measures the machine's CPU instead).
        "children_cpu_ms": None if tool == "ppe" or _zygote(tool) else clock.children / n * 1000,
    }


def _zygote(tool: str) -> bool:
    return tool.startswith("sandboxrun-") and tool != "sandboxrun-fork"


# The buckets name sandboxrun's private modules and methods: keep them true to the code.
PROFILE_PARTS = {  # name: (file suffix(es), "~" for builtins; function; cumulative time?)
    "select": ("~", "<method 'poll' of 'select.epoll' objects>", False),
    "fork": ("~", "<built-in method posix.fork>", False),
    "start": (("multiprocessing/process.py", "sandboxrun/_forked.py"), "start", True),
    "sandbox": ("cgroup_v1.py", "sandbox", True),
    "launch": ("_scheduler.py", "_launch", True),
    "collect": ("cgroup_v1.py", "collect", True),
    "remove": ("cgroup_v1.py", "remove", True),
    "finish": ("_scheduler.py", "_finish", True),
}


def case_profile(tool: str, p: Params) -> Result:
    """The manager's own time per task under cProfile, in buckets (sandboxrun only)."""
    import cProfile
    import pstats

    n = p["n"]
    run = runner(tool)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    run([(trivial, (i,)) for i in range(n)])
    profile.disable()
    wall = time.perf_counter() - start
    # {(file, line, name): (cc, nc, tt, ct, callers)}: a documented-by-use attribute
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    t: dict[str, float] = {}
    for part, (suffix, name, cumulative) in PROFILE_PARTS.items():
        t[part] = sum(
            value[3] if cumulative else value[2]
            for (file, _, function), value in stats.items()
            if function == name and file.endswith(suffix)
        )
    found = {  # nested parts reported once each
        "waiting in select (the workers run)": t["select"],
        "launch: fork (parent side)": t["fork"],
        "launch: Process.start besides fork": t["start"] - t["fork"],
        "launch: task cgroups (mkdir, limits)": t["sandbox"],
        "launch: the rest (pipes, pidfd, selector)": t["launch"] - t["start"] - t["sandbox"],
        "finish: collect (cgroup.procs, counters)": t["collect"],
        "finish: remove (rmdir)": t["remove"],
        "finish: the rest (join, result)": t["finish"] - t["collect"] - t["remove"],
    }
    found["the loop itself"] = wall - sum(found.values())
    return {
        "n": n,
        "wall_ms": wall / n * 1000,
        "buckets_ms": {label: seconds / n * 1000 for label, seconds in found.items()},
    }


def case_cpu(tool: str, p: Params) -> Result:
    """CPU of the manager process (and of its helper processes) while two tasks sleep."""
    run = runner(tool)
    with _CpuClock() as clock:
        outcomes = run([(sleeper, (p["sleep"],)), (sleeper, (p["sleep"],))])
    tasks = sum(o["result"] for o in outcomes if o["success"])
    return {
        "ok": sum(1 for o in outcomes if o["success"]),
        "wall_s": clock.wall,
        "parent_cpu_s": clock.parent,
        "children_cpu_s": clock.children,
        "tasks_cpu_s": tasks,
        # ProcessPoolExecutor's task processes are the forkserver's children, not ours.
        "helpers_cpu_s": None if tool == "ppe" else max(0.0, clock.children - tasks),
    }


def _timeline(log: str) -> list[tuple[float, int, int]]:
    """The allocator's log: (ms since start, bytes allocated, VmHWM) per step."""
    timeline = []
    with contextlib.suppress(OSError), open(log) as lines:
        for line in lines:
            fields = line.split()
            if len(fields) == 3:
                timeline.append((float(fields[0]), int(fields[1]), int(fields[2])))
    return timeline


def case_strict(tool: str, p: Params) -> Result:
    """A fast allocator under a memory limit: the true peak, from the task's own log."""
    run = runner(tool)
    with tempfile.TemporaryDirectory(prefix="bench-strict-") as tmp:
        log = os.path.join(tmp, "alloc.log")
        outcomes = run([(allocator, (log, p["step"], p["total"]))], memory_gib=p["limit"] / GIB)
        timeline = _timeline(log)
    o = outcomes[0]
    peak_alloc = max((t[1] for t in timeline), default=0)
    peak_hwm = max((t[2] for t in timeline), default=0)
    start_hwm = timeline[0][2] if timeline else 0
    return {
        "limit_mib": p["limit"] / MIB,
        "completed": peak_alloc >= p["total"],
        "peak_alloc_mib": peak_alloc / MIB,
        "peak_hwm_mib": peak_hwm / MIB,
        "start_hwm_mib": start_hwm / MIB,
        "overshoot_mib": max(0.0, (peak_hwm - p["limit"]) / MIB),
        "last_step_ms": timeline[-1][0] if timeline else None,
        "reported_oom": o.get("oom"),
        "reported_max_mib": None if o.get("max_mem_gib") is None else o["max_mem_gib"] * 1024,
        "success": o["success"],
        "exit_code": o.get("exit_code"),
        "error": o["error"],
        "timeline": [(ms, a / MIB, h / MIB) for ms, a, h in timeline],
    }


def case_peak(tool: str, p: Params) -> Result:
    """Reported peak memory vs the task's own VmHWM."""
    run = runner(tool)
    outcomes = run([(toucher, (p["mib"], p["hold"]))], memory_gib=p["limit_gib"])
    o = outcomes[0]
    if not o["success"]:
        return {"error": o["error"]}
    truth = o["result"]["vmhwm"] / MIB
    reported = None if o.get("max_mem_gib") is None else o["max_mem_gib"] * 1024
    return {
        "mib": p["mib"],
        "hold": p["hold"],
        "truth_mib": truth,
        "start_mib": o["result"]["before"] / MIB,
        "reported_mib": reported,
        "error_mib": None if reported is None else reported - truth,
    }


def _gone(pid: int) -> bool:
    """Not there, or a zombie (dead, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


def _timeout_side(run: Run, pid_path: str, timeout: float, summary_w: int) -> None:
    """The forked child: run the hostile task through the tool, send a summary, exit."""
    code = 0
    # The task reports its pids as /proc numbers them; under the default isolation its /proc is
    # its own PID namespace's (pid 2, ...), which would make us poll -- and at the end kill --
    # unrelated host pids. The tree kill is the same in every profile: SIGKILL of its PID 1.
    os.environ["SANDBOXRUN_ISOLATION"] = "none"
    try:
        o = run([(hostile, (pid_path,))], timeout=timeout)[0]
        keys = ("success", "timed_out", "exit_code", "error", "start_time")
        summary = {k: o.get(k) for k in keys}
    except BaseException as error:
        summary, code = {"error": repr(error)}, 1
    with contextlib.suppress(OSError):
        os.write(summary_w, json.dumps(summary).encode())
    os._exit(code)


def _reap_tool(child: int, seconds: float) -> bool:
    """Wait for the tool's process to finish; kill it (our own child) after ``seconds``.
    True when it had to be killed."""
    finish_deadline = time.monotonic() + seconds
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > finish_deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return True
        time.sleep(0.01)
    return False


def case_timeout(tool: str, p: Params) -> Result:
    """Time from the deadline until the SIGTERM-ignoring task and its grandchild are gone.

    The tool runs in a forked child; this process polls the two pids every millisecond.
    """
    run = runner(tool)
    timeout, cap = p["timeout"], p["cap"]
    with tempfile.TemporaryDirectory(prefix="bench-timeout-") as tmp:
        pid_path = os.path.join(tmp, "pids")
        summary_r, summary_w = os.pipe()
        child = os.fork()
        if child == 0:  # the tool's side
            os.close(summary_r)
            _timeout_side(run, pid_path, timeout, summary_w)
        os.close(summary_w)
        # Wait for the task to say who it is.
        appear_deadline = time.monotonic() + 30
        while not os.path.exists(pid_path) and time.monotonic() < appear_deadline:
            time.sleep(0.001)
        try:
            task_pid, grandchild_pid, entered = Path(pid_path).read_text().split()
        except (OSError, ValueError):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return {"error": "the task never reported its pids"}
        pids = {"task": int(task_pid), "grandchild": int(grandchild_pid)}
        # Poll until the latest deadline either clock could give; the earliest is used below.
        deadline = float(entered) + timeout
        gone_at: dict[str, float] = {}
        while len(gone_at) < len(pids) and time.monotonic() < deadline + cap:
            now = time.monotonic()
            for name, pid in pids.items():
                if name not in gone_at and _gone(pid):
                    gone_at[name] = now
            time.sleep(0.001)
        survivors = [name for name in pids if name not in gone_at]
        for name in survivors:  # only the pids our task reported
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[name], signal.SIGKILL)
        # The tool should now finish; give it a while, then end it (our own child).
        stuck = _reap_tool(child, 20)
        with os.fdopen(summary_r, "rb") as reader:
            raw = reader.read()
        summary = json.loads(raw) if raw else {}
    # The deadline: the task's entry + timeout, or the tool's own clock start (its reported
    # start_time, wall clock) + timeout when that is earlier, so no latency is understated.
    entry_lag_ms = None
    if isinstance(summary.get("start_time"), float):
        tool_start = summary["start_time"] - (time.time() - time.monotonic())
        deadline = min(deadline, tool_start + timeout)
        entry_lag_ms = (float(entered) - tool_start) * 1000
    after = {name: (gone_at[name] - deadline) * 1000 for name in gone_at}
    return {
        "task_ms": after.get("task"),
        "grandchild_ms": after.get("grandchild"),
        "last_ms": None if survivors else max(after.values()),
        "survivors": survivors,
        "cap_s": cap,
        "entry_lag_ms": entry_lag_ms,
        "tool_stuck": stuck,
        "reported_timed_out": summary.get("timed_out"),
        "exit_code": summary.get("exit_code"),
        "error": summary.get("error"),
    }


def case_bigresult(tool: str, p: Params) -> Result:
    """A ``size``-byte bytes result: time to deliver it and this process's peak memory."""
    run = runner(tool)
    base = _maxrss_mib()
    start = time.perf_counter()
    outcomes = run([(big_result, (p["size"],))])
    wall = time.perf_counter() - start
    o = outcomes[0]
    ok = o["success"] and len(o["result"][1]) == p["size"]
    return {
        "ok": ok,
        "error": o["error"],
        "delivery_s": o["t_got"] - o["result"][0] if ok else None,
        "wall_s": wall,
        "parent_peak_mib": _maxrss_mib(),
        "parent_base_mib": base,
        "children_peak_mib": _maxrss_mib(resource.RUSAGE_CHILDREN),
    }


CASES: dict[str, Callable[[str, Params], Result]] = {
    "throughput": case_tasks,
    "scale": case_tasks,
    "cpu": case_cpu,
    "strict": case_strict,
    "peak": case_peak,
    "timeout": case_timeout,
    "bigresult": case_bigresult,
    "profile": case_profile,
    **CPU_CASES,  # cpu_overhead, cpu_kill (sandboxrun only)
    **ISOLATION_CASES,  # isolation: none / default / strict side by side (sandboxrun only)
    **LAUNCHER_CASES,  # launch: zygote vs fork launcher vs Glasswall, small and server manager
    "executor": case_executor,
    "dask": case_dask,
}
