#!/usr/bin/env python3
"""Benchmarks: sandboxrun side by side with the Glasswall process manager and the Python peers.

    python scripts/bench.py                   # full run, writes docs/benchmarks.md and docs/*.png
    python scripts/bench.py --quick --only sandboxrun --out /tmp/x   # seconds, sandboxrun only

Every measurement of every tool runs in a fresh interpreter: this script re-invokes itself as
``bench.py --one TOOL CASE PARAMS_JSON`` and reads back one ``BENCH-RESULT {json}`` line, so no
tool shares imports, threads or memory with another, and a "parent peak memory" is the
measuring subprocess's own ``ru_maxrss``. The peers (glasswall, pebble) and matplotlib are
optional: a tool that is not installed is reported as n/a, and the plots are skipped.

Keep the module's top level light (stdlib only): under ``forkserver`` every task process of
``ProcessPoolExecutor`` re-imports this file as ``__mp_main__``.
"""

# ruff: noqa: RUF001 - the report is typeset: the multiplication and minus signs are meant
from __future__ import annotations

import os
import resource
import signal
import sys
import time


class _Lazy:
    """A module imported on first use. Task processes import this file (under forkserver as
    ``__mp_main__``), so it must cost them next to nothing: only the orchestrator and the
    report need argparse, json, statistics and the rest."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str):
        import importlib

        return getattr(importlib.import_module(self._name), attribute)


argparse = _Lazy("argparse")
contextlib = _Lazy("contextlib")
datetime = _Lazy("datetime")
errno = _Lazy("errno")
json = _Lazy("json")
platform = _Lazy("platform")
statistics = _Lazy("statistics")
subprocess = _Lazy("subprocess")
tempfile = _Lazy("tempfile")


def Path(*parts):  # stands in for pathlib.Path, imported on first use
    from pathlib import Path as _Path

    return _Path(*parts)


MIB = 1 << 20
GIB = 1 << 30
RESULT_MARK = "BENCH-RESULT "
SANDBOXRUN_BACKENDS = ("cgroup_v2", "cgroup_v1", "psutil")
PEERS = ("glasswall", "pebble", "ppe")
SCALE_BUDGET_S = 120  # per tool and size in "cost as work grows"
LABELS = {
    "sandboxrun-cgroup_v2": "sandboxrun (cgroup_v2)",
    "sandboxrun-cgroup_v1": "sandboxrun (cgroup_v1)",
    "sandboxrun-psutil": "sandboxrun (psutil)",
    "glasswall": "Glasswall manager 5.12",
    "pebble": "pebble ProcessPool(max_tasks=1)",
    "ppe": "ProcessPoolExecutor(forkserver, max_tasks_per_child=1)",
}
SHORT = {  # for the plots
    "sandboxrun-cgroup_v2": "sandboxrun\ncgroup_v2",
    "sandboxrun-cgroup_v1": "sandboxrun\ncgroup_v1",
    "sandboxrun-psutil": "sandboxrun\npsutil",
    "glasswall": "Glasswall\nmanager 5.12",
    "pebble": "pebble\nmax_tasks=1",
    "ppe": "ProcessPool-\nExecutor\nforkserver",
}
CANNOT = {  # (tool, case) -> why the tool cannot take part
    ("pebble", "strict"): "no per-task memory limit (pebble#22 declined)",
    ("ppe", "strict"): "no per-task memory limit",
    ("pebble", "peak"): "reports no peak memory",
    ("ppe", "peak"): "reports no peak memory",
    ("ppe", "timeout"): "no per-task timeout (`result(timeout)` does not stop the task)",
}


# =============================================================================== task functions
# Module level, so every start method can reach them by name.


def trivial(i: int) -> int:
    return i


def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime  # the task's own CPU, to subtract from the parent's


def _vmhwm() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def allocator(log_path: str, step: int, total: int) -> int:
    """Allocate ``step`` bytes at a time, as fast as possible, logging after every step."""
    start = time.monotonic()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"0.000 0 {_vmhwm()}\n".encode())
    chunks = []
    allocated = 0
    while allocated < total:
        chunks.append(b"x" * step)  # bytes * n writes every page: really resident
        allocated += step
        ms = (time.monotonic() - start) * 1000
        os.write(fd, f"{ms:.3f} {allocated} {_vmhwm()}\n".encode())
    os.close(fd)
    return allocated


def toucher(mib: int, hold_seconds: float) -> dict:
    """Touch ``mib`` MiB and report this process's own peak RSS (VmHWM), at once or later."""
    before = _vmhwm()
    data = b"x" * (mib * MIB)
    peak = _vmhwm()
    if hold_seconds:
        time.sleep(hold_seconds)
    del data
    return {"vmhwm": peak, "before": before}


def hostile(pid_path: str) -> None:
    """Ignore SIGTERM, start a grandchild in its own session, then hang."""
    entered = time.monotonic()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    temporary = pid_path + ".tmp"
    with open(temporary, "w") as out:
        out.write(f"{os.getpid()} {child.pid} {entered}\n")
    os.rename(temporary, pid_path)
    while True:
        time.sleep(1)


def big_result(size: int) -> tuple[float, bytes]:
    data = b"x" * size
    return time.monotonic(), data


# =============================================================================== tool adapters
# Each runs a batch of (function, args) with 2 workers and a fresh process per task, and returns
# one outcome dict per task: success, result, error, timed_out, oom, max_mem_gib, exit_code,
# t_got (time.monotonic() when the result reached this process).


def _outcome(**fields) -> dict:
    fields.setdefault("t_got", time.monotonic())
    return fields


def run_sandboxrun(backend, calls, timeout=None, memory_gib=None, workers=2):
    from sandboxrun import ProcessManager, Task

    outcomes = []
    with ProcessManager(
        workers, timeout, memory_gib, backend=backend, start_method="fork"
    ) as manager:
        for func, args in calls:
            manager.queue_task(Task(func, args))
        for r in manager.as_completed():
            outcomes.append(
                _outcome(
                    success=r.success,
                    result=r.result,
                    error=None if r.exception is None else repr(r.exception)[:200],
                    timed_out=r.timed_out,
                    oom=r.out_of_memory,
                    max_mem_gib=r.max_memory_used_in_gib,
                    exit_code=r.exit_code,
                    start_time=r.start_time,
                )
            )
    return outcomes


def run_glasswall(calls, timeout=None, memory_gib=None, workers=2):
    from glasswall.multiprocessing import GlasswallProcessManager, Task

    outcomes = []
    with GlasswallProcessManager(workers, timeout, memory_gib) as manager:
        for func, args in calls:
            manager.queue_task(Task(func, args))
        for r in manager.as_completed():
            outcomes.append(
                _outcome(
                    success=r.success,
                    result=r.result,
                    error=None if r.exception is None else repr(r.exception)[:200],
                    timed_out=getattr(r, "timed_out", None),
                    oom=getattr(r, "out_of_memory", None),
                    max_mem_gib=getattr(r, "max_memory_used_in_gib", None),
                    exit_code=getattr(r, "exit_code", None),
                    start_time=getattr(r, "start_time", None),
                )
            )
    return outcomes


def _futures_outcomes(futures) -> list[dict]:
    import concurrent.futures

    outcomes = []
    for future in concurrent.futures.as_completed(futures):
        got = time.monotonic()
        try:
            outcomes.append(_outcome(success=True, result=future.result(), error=None, t_got=got))
        except BaseException as error:
            outcomes.append(
                _outcome(
                    success=False,
                    result=None,
                    error=repr(error)[:200],
                    timed_out=isinstance(error, TimeoutError),
                    t_got=got,
                )
            )
    return outcomes


def run_pebble(calls, timeout=None, memory_gib=None, workers=2):
    import warnings

    import pebble

    with pebble.ProcessPool(max_workers=workers, max_tasks=1) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            futures = [pool.schedule(func, args=args, timeout=timeout) for func, args in calls]
        outcomes = _futures_outcomes(futures)
    return outcomes


def run_ppe(calls, timeout=None, memory_gib=None, workers=2):
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, max_tasks_per_child=1, mp_context=context
    ) as executor:
        futures = [executor.submit(func, *args) for func, args in calls]
        outcomes = _futures_outcomes(futures)
    return outcomes


def runner(tool: str):
    if tool.startswith("sandboxrun-"):
        backend = tool.split("-", 1)[1]
        return lambda *a, **k: run_sandboxrun(backend, *a, **k)
    return {"glasswall": run_glasswall, "pebble": run_pebble, "ppe": run_ppe}[tool]


def tool_unavailable(tool: str) -> str | None:
    """None when ``tool`` can run here, else why not."""
    import importlib.util

    if tool.startswith("sandboxrun-"):
        if importlib.util.find_spec("sandboxrun") is None:
            return "sandboxrun is not installed"
        from sandboxrun import detect

        entry = detect()["backends"].get(tool.split("-", 1)[1])
        if entry is None or not entry["available"]:
            return f"backend unavailable here: {entry and entry['reason']}"
        return None
    module = {"glasswall": "glasswall", "pebble": "pebble", "ppe": "concurrent.futures"}[tool]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


# =============================================================================== cases (--one)


def _maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def case_tasks(tool, p):
    """Throughput and per-task cost: ``n`` trivial tasks, 2 workers, a fresh process each."""
    n = p["n"]
    run = runner(tool)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    outcomes = run([(trivial, (i,)) for i in range(n)])
    wall = time.perf_counter() - start
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "n": n,
        "ok": sum(1 for o in outcomes if o["success"]),
        "wall_s": wall,
        "tasks_per_s": n / wall,
        "per_task_ms": wall / n * 1000,
        "maxrss_mib": _maxrss_mib(),
        "parent_cpu_ms": (_cpu(self1) - _cpu(self0)) / n * 1000,
        # ProcessPoolExecutor's task processes are the forkserver's children, not ours.
        "children_cpu_ms": None if tool == "ppe" else (_cpu(kids1) - _cpu(kids0)) / n * 1000,
    }


PROFILE_PARTS = {  # name: (file suffix(es), "~" for builtins; function; cumulative time?)
    "select": ("~", "<method 'poll' of 'select.epoll' objects>", False),
    "fork": ("~", "<built-in method posix.fork>", False),
    "start": (("multiprocessing/process.py", "sandboxrun/_launch.py"), "start", True),
    "sandbox": ("cgroup_v1.py", "sandbox", True),
    "launch": ("_scheduler.py", "_launch", True),
    "collect": ("cgroup_v1.py", "collect", True),
    "remove": ("cgroup_v1.py", "remove", True),
    "finish": ("_scheduler.py", "_finish", True),
}


def case_profile(tool, p):
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
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    t = {}
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


def case_cpu(tool, p):
    """CPU of the manager process (and of its helper processes) while two tasks sleep."""
    run = runner(tool)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    outcomes = run([(sleeper, (p["sleep"],)), (sleeper, (p["sleep"],))])
    wall = time.perf_counter() - start
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tasks = sum(o["result"] for o in outcomes if o["success"])
    children = _cpu(kids1) - _cpu(kids0)
    return {
        "ok": sum(1 for o in outcomes if o["success"]),
        "wall_s": wall,
        "parent_cpu_s": _cpu(self1) - _cpu(self0),
        "children_cpu_s": children,
        "tasks_cpu_s": tasks,
        # ProcessPoolExecutor's task processes are the forkserver's children, not ours.
        "helpers_cpu_s": None if tool == "ppe" else max(0.0, children - tasks),
    }


def case_strict(tool, p):
    """A fast allocator under a memory limit: the true peak, from the task's own log."""
    run = runner(tool)
    with tempfile.TemporaryDirectory(prefix="bench-strict-") as tmp:
        log = os.path.join(tmp, "alloc.log")
        outcomes = run(
            [(allocator, (log, p["step"], p["total"]))], memory_gib=p["limit"] / GIB
        )
        timeline = []
        with contextlib.suppress(OSError), open(log) as lines:
            for line in lines:
                fields = line.split()
                if len(fields) == 3:
                    timeline.append((float(fields[0]), int(fields[1]), int(fields[2])))
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


def case_peak(tool, p):
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


def case_timeout(tool, p):
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
            code = 0
            try:
                o = run([(hostile, (pid_path,))], timeout=timeout)[0]
                keys = ("success", "timed_out", "exit_code", "error", "start_time")
                summary = {k: o.get(k) for k in keys}
            except BaseException as error:
                summary, code = {"error": repr(error)}, 1
            with contextlib.suppress(OSError):
                os.write(summary_w, json.dumps(summary).encode())
            os._exit(code)
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
        stuck = False
        finish_deadline = time.monotonic() + 20
        while os.waitpid(child, os.WNOHANG) == (0, 0):
            if time.monotonic() > finish_deadline:
                stuck = True
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                break
            time.sleep(0.01)
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


def case_bigresult(tool, p):
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


# ------------------------------------------------------------------------------- physical floor


def floor_fork(p):
    n = p["n"]
    start = time.perf_counter()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    wall = time.perf_counter() - start
    return {"n": n, "per_task_ms": wall / n * 1000}


V1_CONTROLLERS = ("memory", "pids", "freezer", "cpu", "cpuacct")


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


def floor_cgroup_v1(p):
    """Per task: mkdir in each v1 hierarchy, a forked child writes 0 to each cgroup.procs and
    exits, rmdir. Only below this process's own cgroups, and every directory made is removed."""
    own = v1_own_dirs()
    missing = [c for c in V1_CONTROLLERS if c not in own]
    if "memory" in missing:
        return {"unavailable": "no cgroup v1 memory hierarchy mounted"}
    name = f"sbbench-{os.getpid()}-{os.urandom(3).hex()}"
    parents = list(dict.fromkeys(own[c] / name for c in V1_CONTROLLERS if c in own))
    made: list[Path] = []
    timings = {"mkdir": [], "enter": [], "rmdir": []}
    try:
        for parent in parents:
            parent.mkdir()
            made.append(parent)
        for i in range(p["n"]):
            dirs = [parent / f"t{i}" for parent in parents]
            t0 = time.perf_counter()
            for d in dirs:
                d.mkdir()
                made.append(d)
            t1 = time.perf_counter()
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
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError("the child could not enter its cgroups")
            t2 = time.perf_counter()
            for d in dirs:
                _rmdir(d)
                made.remove(d)
            t3 = time.perf_counter()
            timings["mkdir"].append(t1 - t0)
            timings["enter"].append(t2 - t1)
            timings["rmdir"].append(t3 - t2)
        # The same fork + enter after the machine's cgroups sat idle for a moment: the first
        # migration then waits for an RCU grace period (cgroup_threadgroup_rwsem).
        idle = []
        for i in range(p.get("idle_n", 0)):
            dirs = [parent / f"idle{i}" for parent in parents]
            for d in dirs:
                d.mkdir()
                made.append(d)
            time.sleep(p["idle_s"])
            t1 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                for d in dirs:
                    with contextlib.suppress(OSError):
                        fd = os.open(d / "cgroup.procs", os.O_WRONLY)
                        os.write(fd, b"0")
                        os.close(fd)
                os._exit(0)
            os.waitpid(pid, 0)
            idle.append((time.perf_counter() - t1) * 1000)
            for d in dirs:
                _rmdir(d)
                made.remove(d)
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


CASES = {
    "throughput": case_tasks,
    "scale": case_tasks,
    "cpu": case_cpu,
    "strict": case_strict,
    "peak": case_peak,
    "timeout": case_timeout,
    "bigresult": case_bigresult,
    "profile": case_profile,
}
FLOORS = {"fork": floor_fork, "cgroup_v1": floor_cgroup_v1}


IMPORTS = {"glasswall": ("glasswall.multiprocessing",), "pebble": ("pebble",),
           "ppe": ("concurrent.futures", "multiprocessing")}  # fmt: skip


def one(tool: str, case: str, params: dict) -> dict:
    if tool == "floor":
        return FLOORS[case](params)
    # Imports are not what is measured: do them before any clock or rusage is read.
    import importlib

    for module in IMPORTS.get(tool, ("sandboxrun",)):
        importlib.import_module(module)
    return CASES[case](tool, params)


# =============================================================================== orchestration


def sizes(quick: bool) -> dict:
    if quick:
        return {
            "rounds": 1,
            "throughput": 20,
            "cpu_sleep": 0.3,
            "strict": {"limit": 256 * MIB, "step": 64 * MIB, "total": 1 * GIB},
            "peak_mib": [50],
            "peak_hold": 0.2,
            "timeout": {"timeout": 0.5, "cap": 3.0},
            "bigresult": 32 * MIB,
            "scale": [20, 50],
            "floor_n": 30,
            "idle_n": 2,
        }
    return {
        "rounds": 3,
        "throughput": 300,
        "cpu_sleep": 2.0,
        "strict": {"limit": 256 * MIB, "step": 64 * MIB, "total": 2 * GIB},
        "peak_mib": [50, 300, 1000],
        "peak_hold": 1.0,
        "timeout": {"timeout": 1.0, "cap": 10.0},
        "bigresult": 256 * MIB,
        "scale": [100, 1000, 10000],
        "floor_n": 300,
        "idle_n": 5,
    }


def spawn_one(tool: str, case: str, params: dict, limit: float = 1800) -> dict:
    # Imported as the module ``bench`` (from a cached .pyc), not run as a script: under
    # forkserver every task process would otherwise re-run and re-compile this file as
    # ``__mp_main__``, a cost that belongs to this script, not to the tool.
    command = [sys.executable, "-c", "import sys, bench; sys.exit(bench.main(sys.argv[1:]))",
               "--one", tool, case, json.dumps(params)]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {limit:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)[:300]}"}


def wait_for_quiet_machine(note: list[str], budget_s: float = 1200) -> float:
    """Another engineer's qemu VM would distort every figure: wait (30 s polls, 20 min max).

    Returns the seconds waited."""
    waited = 0
    while qemu_running():
        if waited >= budget_s:
            text = "a qemu VM was still running after 20 min of waiting: measured alongside it"
            if text not in note:
                note.append(text)
                print(f"bench: {text}", file=sys.stderr)
            return waited
        if waited == 0:
            print("bench: qemu-system is running, waiting for it (30 s polls)", file=sys.stderr)
        time.sleep(30)
        waited += 30
    return waited


def snapshot_sandboxrun(into: Path) -> dict:
    """Copy the sandboxrun package being measured and put the copy first on PYTHONPATH.

    Other people may commit to the checkout while a run goes on (an editable install would pick
    their changes up half-way); every measurement then uses the same code, named in the report.
    """
    import hashlib
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("sandboxrun")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(source, into / "sandboxrun", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((into / "sandboxrun").rglob("*.py")):
        digest.update(path.relative_to(into).as_posix().encode() + path.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(into), os.environ.get("PYTHONPATH")])
    )
    sys.path.insert(0, str(into))
    info = {"source": str(source), "sha256": digest.hexdigest()[:12]}

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(source.parent), *command],
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit:
        info["commit"] = commit
        info["dirty"] = bool(git("status", "--porcelain", "--", str(source)))
    return info


def qemu_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True)
    return found.returncode == 0


def select_tools(only: list[str] | None) -> list[str]:
    tools = [f"sandboxrun-{b}" for b in SANDBOXRUN_BACKENDS] + list(PEERS)
    if only:
        wanted = set()
        for name in only:
            wanted |= {t for t in tools if t == name or t.startswith(name + "-")}
        tools = [t for t in tools if t in wanted]
    return tools


class Runner:
    def __init__(self, args, notes: list[str]):
        self.args = args
        self.notes = notes
        self.guard = not args.quick and not args.no_wait
        self.waited = 0.0
        self.redone = 0
        self.s = sizes(args.quick)
        self.data: dict = {"runs": {}, "skipped": {}, "floor": {}}
        self.tools = []
        for tool in select_tools(args.only):
            reason = tool_unavailable(tool)
            if reason is None:
                self.tools.append(tool)
            elif tool != "sandboxrun-cgroup_v2" or "cgroup_v2" in (args.only or []):
                self.data["skipped"][tool] = reason

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def spawn(self, tool: str, case: str, params: dict) -> dict:
        """One measurement; in a full run, one that overlapped a qemu VM is measured again."""
        for _ in range(3):
            if self.guard and qemu_running():
                self.waited += wait_for_quiet_machine(self.notes, 1200 - self.waited)
            result = spawn_one(tool, case, params)
            if not (self.guard and qemu_running() and self.waited < 1200):
                break
            self.redone += 1
        return result

    def measure(self, key: str, case: str, params: dict, rounds: int, tools=None) -> None:
        """``rounds`` rounds; within a round every tool once, so slow drift hits all alike."""
        tools = [t for t in (tools or self.tools) if (t, case) not in CANNOT]
        store = self.data["runs"].setdefault(key, {"params": params, "rounds": {}})
        for round_number in range(rounds):
            for tool in tools:
                result = self.spawn(tool, case, params)
                store["rounds"].setdefault(tool, []).append(result)
                shown = {k: v for k, v in result.items() if k != "timeline"}
                self.log(f"{key} {tool} round {round_number + 1}/{rounds}: {shown}")

    def run(self) -> dict:
        s, quick = self.s, self.args.quick
        rounds = self.args.rounds or s["rounds"]
        self.data["rounds"] = rounds
        self.log(f"tools: {', '.join(self.tools)}; skipped: {self.data['skipped']}")
        self.data["floor"]["fork"] = [
            self.spawn("floor", "fork", {"n": s["floor_n"] * 4}) for _ in range(rounds)
        ]
        self.data["floor"]["cgroup_v1"] = [
            self.spawn("floor", "cgroup_v1", {"n": s["floor_n"], "idle_n": s["idle_n"],
                                              "idle_s": 0.3}) for _ in range(rounds)
        ]
        self.log(f"floor: {self.data['floor']}")
        self.measure("throughput", "throughput", {"n": s["throughput"]}, rounds)
        ours = [t for t in self.tools if t.startswith("sandboxrun-")][:1]
        if ours:
            self.measure("profile", "profile", {"n": s["throughput"]}, 1, ours)
        self.measure("cpu", "cpu", {"sleep": s["cpu_sleep"]}, rounds)
        self.measure("strict", "strict", s["strict"], rounds)
        for mib in s["peak_mib"]:
            for hold in (0.0, s["peak_hold"]):
                params = {"mib": mib, "hold": hold, "limit_gib": 4}
                self.measure(f"peak-{mib}-{hold}", "peak", params, rounds)
        self.measure("timeout", "timeout", s["timeout"], rounds)
        self.measure("bigresult", "bigresult", {"size": s["bigresult"]}, rounds)
        for n in s["scale"]:
            tools = self.tools
            if not quick:
                # sandboxrun and GPM always; a peer only if one round fits the time budget.
                def fits(tool: str, n: int = n) -> bool:
                    rate = self.median("throughput", tool, "tasks_per_s")
                    return bool(rate) and n / rate <= SCALE_BUDGET_S

                tools = [t for t in self.tools if t.startswith("sandboxrun-") or t == "glasswall"
                         or fits(t)]  # fmt: skip
                for peer in set(self.tools) - set(tools):
                    rate = self.median("throughput", peer, "tasks_per_s")
                    minutes = f"~{n / rate / 60:.0f} min per round" if rate else "too long"
                    self.data.setdefault("scale_skipped", {})[peer] = (
                        f"not run at {n}: at its measured {rate or 0:.0f} tasks/s that is "
                        f"{minutes}"
                    )
            for tool in tools:
                # As many rounds as fit in about two minutes, at least one.
                rate = self.median("throughput", tool, "tasks_per_s")
                fit = int(SCALE_BUDGET_S * rate / n) if rate else 1
                self.measure(f"scale-{n}", "scale", {"n": n}, max(1, min(rounds, fit)), [tool])
        return self.data

    def median(self, key, tool, field):
        values = _values(self.data, key, tool, field)
        return statistics.median(values) if values else None


# =============================================================================== the report


def _values(data, key, tool, field) -> list[float]:
    rounds = data["runs"].get(key, {}).get("rounds", {}).get(tool, [])
    return [r[field] for r in rounds if isinstance(r.get(field), (int, float))]


def _fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "n/a"
    if digits is None:
        magnitude = abs(value)
        digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:,.{digits}f}".replace(",", " ")


def _tri(values: list[float], digits: int | None = None) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return _fmt(values[0], digits)
    return " / ".join(
        _fmt(v, digits) for v in (min(values), statistics.median(values), max(values))
    )


def _ratio(ours: float | None, theirs: float | None, inverse: bool = False) -> str:
    if not ours or not theirs:
        return "n/a"
    value = theirs / ours if inverse else ours / theirs
    return f"{value:,.1f}×".replace(",", " ")


def _unit(value: float | None, unit: str, digits: int | None = None) -> str:
    return "n/a" if value is None else f"{_fmt(value, digits)} {unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _errors(data, key, tool) -> str:
    rounds = data["runs"].get(key, {}).get("rounds", {}).get(tool, [])
    errors = [r["error"] for r in rounds if r.get("error") and len(r) == 1]
    return f"failed: {errors[0]}" if errors else ""


def _machine() -> dict:
    from importlib import metadata

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("sandboxrun", "glasswall", "pebble", "psutil", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


class Report:
    def __init__(self, data: dict, meta: dict, quick: bool):
        self.d = data
        self.meta = meta
        self.quick = quick
        self.ours = next(
            (f"sandboxrun-{b}" for b in ("cgroup_v2", "cgroup_v1") if self._has(f"sandboxrun-{b}")),
            "sandboxrun-psutil",
        )
        self.tools = [t for t in LABELS if self._has(t)]

    def _has(self, tool: str) -> bool:
        return any(tool in run["rounds"] for run in self.d["runs"].values())

    def label(self, tool: str) -> str:
        return LABELS.get(tool, tool)

    def v(self, key, tool, field):
        return _values(self.d, key, tool, field)

    def med(self, key, tool, field):
        values = self.v(key, tool, field)
        return statistics.median(values) if values else None

    def rounds(self, key, tool) -> int:
        return len(self.d["runs"].get(key, {}).get("rounds", {}).get(tool, []))

    def na(self, tool, case) -> str | None:
        if (tool, case) in CANNOT:
            return f"n/a: {CANNOT[(tool, case)]}"
        return None

    # ---------------------------------------------------------------------------- sections

    def render(self) -> str:
        m = self.meta
        lines = [
            "# Benchmarks",
            "",
            "<!-- Generated by scripts/bench.py (run through scripts/bench.sh); do not edit. -->",
            "",
            "Regenerate with `bash scripts/bench.sh` (a separate venv, `.bench-venv/`, with the"
            " peers; about 15 minutes; it waits while another qemu VM runs on the machine)."
            " `python scripts/bench.py --quick` is a smoke run of a few seconds.",
            "",
            "sandboxrun next to the Glasswall process manager (GPM) and the Python pools that can"
            " run every task in a fresh process. Every measurement of every tool ran in a fresh"
            " interpreter (`bench.py --one TOOL CASE`), 2 workers, start method `fork` for"
            " sandboxrun, GPM and pebble, `forkserver` for ProcessPoolExecutor (its"
            " `max_tasks_per_child` refuses `fork`). Figures are **min / median / max** over the"
            " rounds shown; a single number is a single round.",
            "",
            "## Machine",
            "",
            f"- date: {m['date']}" + (" (**--quick**: tiny sizes, not for comparison)"
                                      if self.quick else ""),
            f"- CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable),"
            f" {m['memory_gib']:.0f} GiB",
            f"- kernel {m['kernel']}, CPython {m['python']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            self._snapshot_line(),
            f"- load average before / after: {m['load_before']} / {m['load_after']};"
            f" run took {m['duration_s']:.0f} s",
        ]
        lines += [f"- note: {note}" for note in m.get("notes", [])]
        for tool, reason in self.d["skipped"].items():
            lines.append(f"- {self.label(tool)}: not measured ({reason})")
        lines.append("")
        for section in (
            self.targets, self.misses, self.throughput, self.cpu, self.strict, self.peak,
            self.timeout, self.bigresult, self.scale, self.floor,
        ):  # fmt: skip
            lines += section()
        return "\n".join(lines).rstrip() + "\n"

    def _snapshot_line(self) -> str:
        snap = self.meta.get("sandboxrun_snapshot") or {}
        if not snap:
            return "- sandboxrun source: unknown"
        where = f"commit {snap['commit']}" if snap.get("commit") else snap["source"]
        if snap.get("dirty"):
            where += " plus uncommitted changes in sandboxrun/"
        return (f"- sandboxrun measured: {where} (source sha256 {snap['sha256']}, copied at the"
                " start so that every measurement ran the same code)")  # fmt: skip

    def targets(self) -> list[str]:
        ours, gpm = self.ours, "glasswall"
        tp_o, tp_g = self.med("throughput", ours, "tasks_per_s"), self.med(
            "throughput", gpm, "tasks_per_s"
        )
        cpu_o, cpu_g = self.med("cpu", ours, "parent_cpu_s"), self.med(
            "cpu", gpm, "parent_cpu_s"
        )
        over = self.v("strict", ours, "overshoot_mib")
        kill = [r.get("last_ms") for r in self.d["runs"].get("timeout", {}).get(
            "rounds", {}).get(ours, [])]  # fmt: skip

        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("**met**" if ok else "**missed**")

        tp_ratio = tp_o / tp_g if tp_o and tp_g else None
        cpu_ratio = cpu_g / cpu_o if cpu_o and cpu_g else None
        kill_max = None if not kill or None in kill else max(kill)
        rows = [
            ["throughput ≥ 10× GPM", _unit(tp_o, "tasks/s"), _unit(tp_g, "tasks/s"),
             _ratio(tp_o, tp_g), verdict(None if tp_ratio is None else tp_ratio >= 10)],
            ["parent CPU while tasks sleep ≥ 40× less", _unit(cpu_o, "s"), _unit(cpu_g, "s"),
             _ratio(cpu_o, cpu_g, inverse=True),
             verdict(None if cpu_ratio is None else cpu_ratio >= 40)],
            ["memory overshoot 0", _unit(max(over) if over else None, "MiB (max)", 0),
             _unit(self.med("strict", gpm, "overshoot_mib"), "MiB", 0), "",
             verdict(None if not over else max(over) == 0)],
            ["timeout kills the whole tree within 20 ms",
             "never" if kill and kill_max is None else f"{_fmt(kill_max)} ms (max)",
             self._timeout_cell(gpm), "",
             verdict(None if not kill else (kill_max is not None and kill_max <= 20))],
        ]  # fmt: skip
        return [
            "## Targets (sandboxrun vs GPM, same run)",
            "",
            f"sandboxrun figures are for `{ours.split('-', 1)[1]}`, the backend `auto` picks here;"
            " medians unless stated.",
            "",
            *_table(["target", "sandboxrun", "GPM", "ratio", "verdict"], rows),
        ]

    def misses(self) -> list[str]:
        """For each missed target: by how much, and what limits it (from this run's figures)."""
        ours, gpm = self.ours, "glasswall"
        out = []
        tp_o = self.med("throughput", ours, "tasks_per_s")
        tp_g = self.med("throughput", gpm, "tasks_per_s")
        if tp_o and tp_g and tp_o < 10 * tp_g:
            need = 10 * tp_g
            cores = self.meta.get("usable_cores") or 2
            a = self.med("throughput", ours, "parent_cpu_ms") or 0
            b = self.med("throughput", ours, "children_cpu_ms") or 0
            ga = self.med("throughput", gpm, "parent_cpu_ms") or 0
            gb = self.med("throughput", gpm, "children_cpu_ms") or 0
            fork = self._floor("fork", "per_task_ms")
            cg = self._floor("cgroup_v1", "total_ms")
            text = (
                f"- **Throughput: {_fmt(tp_o)} tasks/s is {tp_o / tp_g:.1f}× GPM's"
                f" {_fmt(tp_g)}; 10× would be {_fmt(need)} tasks/s**, a task every"
                f" {1000 / need:.2f} ms of wall time."
            )
            floor = statistics.median(cg) if cg else statistics.median(fork) if fork else None
            if fork:
                f = statistics.median(fork)
                text += (
                    f" The physical floor measured in the same run: a bare `fork` + `_exit` +"
                    f" `waitpid` from a bare interpreter takes {f:.2f} ms"
                )
                if cg:
                    text += f", with the cgroup v1 work per task {statistics.median(cg):.2f} ms"
                text += " (one at a time, no Python in the child)."
            if a and b:
                budget = cores * 1000 / need
                text += (
                    f" sandboxrun spends {a:.2f} ms of manager CPU and {b:.2f} ms in the worker"
                    f" (fork child side, bootstrap, entering the cgroups, exit) per task:"
                    f" {a + b:.2f} ms on {cores} cores, so at most {cores * 1000 / (a + b):.0f}"
                    f" tasks/s even with perfect overlap; GPM spends {ga:.2f} + {gb:.2f} ms."
                    f" 10× needs under {budget:.2f} ms of CPU per task for everything"
                )
                if floor and budget <= floor:
                    text += (
                        ", no more than the floor itself: out of reach for any manager that"
                        " forks a fresh process into fresh cgroups per task on this machine."
                    )
                elif floor:
                    text += (
                        f"; the floor leaves {budget - floor:.2f} ms of that for all the Python"
                        f" in manager and worker, where sandboxrun now spends"
                        f" {a + b - floor:.2f} ms above the floor"
                        f" ({(a + b - floor) / (budget - floor):.0f}× too much)."
                    )
                    if b > budget:
                        text += (
                            f" The forked Python worker alone uses {b:.2f} ms of CPU per task,"
                            " more than the whole budget: 10× is out of reach with a fresh"
                            " Python process per task on this machine."
                        )
                    text += " What the manager can still shed is in the profile in section 1."
                else:
                    text += "."
            out.append(text)
        cpu_o = self.med("cpu", ours, "parent_cpu_s")
        cpu_g = self.med("cpu", gpm, "parent_cpu_s")
        if cpu_o and cpu_g and cpu_g < 40 * cpu_o:
            out.append(
                f"- **Parent CPU: {cpu_g / cpu_o:.1f}× less than GPM, not 40×.** sandboxrun's"
                f" {cpu_o:.3f} s is launching and collecting the two tasks; it does not grow"
                " with the sleep, GPM's busy loop does (it burns about one core for as long as"
                " a task runs), so the ratio grows with the tasks' duration."
            )
        over = self.v("strict", ours, "overshoot_mib")
        if over and max(over) > 0:
            out.append(f"- **Memory overshoot: up to {max(over):.0f} MiB over the limit.**")
        rounds = self.d["runs"].get("timeout", {}).get("rounds", {}).get(ours, [])
        kill = [r.get("last_ms") for r in rounds]
        if kill and (None in kill or max(kill) > 20):
            worst = "never" if None in kill else f"{max(kill):.1f} ms"
            out.append(f"- **Timeout: the whole tree was gone after {worst}, not 20 ms.**")
        if not out:
            return []
        return ["### Where a target is missed", "", *out, ""]

    def _timeout_cell(self, tool) -> str:
        rounds = self.d["runs"].get("timeout", {}).get("rounds", {}).get(tool, [])
        if not rounds:
            return "n/a"
        if any(r.get("survivors") for r in rounds):
            cap = rounds[0].get("cap_s")
            return f"never (still alive after {_fmt(cap, 0)} s)"
        return f"{_fmt(max(r['last_ms'] for r in rounds))} ms (max)"

    def throughput(self) -> list[str]:
        n = self.d["runs"].get("throughput", {}).get("params", {}).get("n")
        rows = []
        gpm = self.med("throughput", "glasswall", "tasks_per_s")
        for tool in self.tools:
            values = self.v("throughput", tool, "tasks_per_s")
            rows.append([
                self.label(tool), _tri(values), _ratio(
                    statistics.median(values) if values else None, gpm),
                _tri(self.v("throughput", tool, "parent_cpu_ms"), 2),
                "n/a (forkserver's children)" if tool == "ppe"
                else _tri(self.v("throughput", tool, "children_cpu_ms"), 2),
                str(self.rounds("throughput", tool)), _errors(self.d, "throughput", tool),
            ])  # fmt: skip
        fork = self._floor("fork", "per_task_ms")
        cg = self._floor("cgroup_v1", "total_ms")
        if fork:
            rows.append(["floor: bare fork + _exit + waitpid, one at a time",
                         _tri([1000 / x for x in fork]), "", "", "", str(len(fork)), "serial"])
        if cg:
            rows.append(["floor: fork + cgroup v1 mkdir/enter/rmdir, one at a time",
                         _tri([1000 / x for x in cg]), "", "", "", str(len(cg)), "serial"])
        return [
            "## 1. Throughput: trivial tasks, a fresh process each",
            "",
            f"{n} tasks returning their argument, `max_workers=2`; wall time from constructing the"
            " manager to the last result (pool start-up and shut-down included). *CPU per task*:"
            " `getrusage` of the manager process (all its threads) and of its reaped children"
            " (for GPM: watchers and tasks), divided by the number of tasks; the machine has 2"
            " cores for all of it.",
            "",
            *_table(["tool", "tasks/s", "vs GPM", "manager CPU ms/task", "children CPU ms/task",
                     "rounds", "note"], rows),
            *(["![throughput](bench-throughput.png)", ""] if self.d.get("plots") else []),
            *self.profile(),
        ]

    def profile(self) -> list[str]:
        runs = self.d["runs"].get("profile", {})
        (tool, rounds), *_ = list(runs.get("rounds", {}).items()) or [(None, [])]
        result = next((r for r in rounds if "buckets_ms" in r), None)
        if result is None:
            return []
        wall = result["wall_ms"]
        rows = [
            [label, _fmt(ms, 3), f"{ms / wall * 100:.0f} %"]
            for label, ms in result["buckets_ms"].items()
        ]
        rows.append(["**wall time per task (profiled)**", _fmt(wall, 3), "100 %"])
        return [
            f"### Where the manager's time goes ({self.label(tool)})",
            "",
            f"One more throughput run of {result['n']} tasks under cProfile, in a fresh"
            " interpreter; the manager's wall time per task split by where its single thread"
            " was. cProfile slows the Python-level parts (roughly 1.5-2×), not the system calls,"
            " so the profiled wall time is longer than the unprofiled one above.",
            "",
            *_table(["where", "ms per task", "share"], rows),
        ]

    def _floor(self, name, field) -> list[float]:
        return [r[field] for r in self.d["floor"].get(name, []) if field in r]

    def cpu(self) -> list[str]:
        params = self.d["runs"].get("cpu", {}).get("params", {})
        gpm = self.med("cpu", "glasswall", "parent_cpu_s")
        rows = []
        for tool in self.tools:
            parent = self.v("cpu", tool, "parent_cpu_s")
            helpers = self.v("cpu", tool, "helpers_cpu_s")
            rows.append([
                self.label(tool), _tri(parent, 3),
                _tri(helpers, 3) if tool != "ppe" else "n/a (forkserver's children)",
                _tri(self.v("cpu", tool, "tasks_cpu_s"), 3),
                _ratio(statistics.median(parent) if parent else None, gpm, inverse=True),
                str(self.rounds("cpu", tool)),
            ])  # fmt: skip
        return [
            f"## 2. Parent CPU while two tasks sleep {params.get('sleep')} s",
            "",
            "CPU seconds (user + sys, `getrusage(RUSAGE_SELF)`, all threads) of the measuring"
            " process, which is the manager, over the whole run. *Helpers*: `RUSAGE_CHILDREN`"
            " minus the tasks' own CPU (each task returns its `RUSAGE_SELF` from inside the"
            " function): GPM's watcher processes; for sandboxrun and pebble only the workers'"
            " own start-up and exit around the function. *GPM ÷ tool*: how many times less CPU"
            " the manager process burns than GPM's.",
            "",
            *_table(["tool", "manager CPU s", "helpers CPU s", "tasks CPU s", "GPM ÷ tool",
                     "rounds"], rows),
        ]

    def strict(self) -> list[str]:
        params = self.d["runs"].get("strict", {}).get("params", {})
        rows = []
        for tool in self.tools:
            na = self.na(tool, "strict")
            if na:
                rows.append([self.label(tool), na, "", "", "", "", "", ""])
                continue
            rounds = self.d["runs"].get("strict", {}).get("rounds", {}).get(tool, [])
            ok = [r for r in rounds if "peak_hwm_mib" in r]
            oom = sorted({str(r.get("reported_oom")) for r in ok})
            completed = sum(1 for r in ok if r.get("completed"))
            rows.append([
                self.label(tool), _tri(self.v("strict", tool, "peak_alloc_mib"), 0),
                _tri(self.v("strict", tool, "peak_hwm_mib"), 0),
                _tri(self.v("strict", tool, "overshoot_mib"), 0),
                _tri(self.v("strict", tool, "last_step_ms"), 0), "/".join(oom) or "n/a",
                _tri(self.v("strict", tool, "reported_max_mib"), 0),
                f"{len(rounds)}" + (f", {completed} ran to the end" if completed else ""),
            ])  # fmt: skip
        limit = params.get("limit", 0) / MIB
        return [
            f"## 3. Memory-limit strictness: a fast allocator under a {limit:.0f} MiB limit",
            "",
            f"The task appends `b\"x\" * {params.get('step', 0) // MIB} MiB` to a list as fast as"
            f" it can, up to {params.get('total', 0) / GIB:.0f} GiB, and after every step appends"
            " `ms-since-start allocated-bytes VmHWM` to a file of its own, so the peak it really"
            " reached is known whatever the tool says. *Peak allocated* / *peak VmHWM*: the last"
            " line logged before it died (the step that killed it is not logged). *Overshoot*:"
            " peak VmHWM minus the limit (VmHWM counts pages shared with the parent since fork"
            " — the interpreter — which the kernel charges to the parent, not to the task)."
            " *OOM reported*: the tool's `out_of_memory`.",
            "",
            *_table(["tool", "peak allocated MiB", "peak VmHWM MiB", "overshoot MiB",
                     "last step at ms", "OOM reported", "reported peak MiB", "rounds"],
                    rows),
            *(["![memory over time](bench-memory-limit.png)", ""] if self.d.get("plots") else []),
        ]

    def peak(self) -> list[str]:
        keys = [k for k in self.d["runs"] if k.startswith("peak-")]
        rows = []
        for key in keys:
            params = self.d["runs"][key]["params"]
            when = "at once" if not params["hold"] else f"after {params['hold']:g} s"
            for tool in self.tools:
                na = self.na(tool, "peak")
                if na:
                    if key == keys[0]:
                        rows.append([self.label(tool), "all", "", "", na, "", ""])
                    continue
                rows.append([
                    self.label(tool), f"{params['mib']} MiB", when,
                    _tri(self.v(key, tool, "truth_mib"), 0),
                    _tri(self.v(key, tool, "reported_mib"), 0),
                    _tri(self.v(key, tool, "error_mib"), 1),
                    str(self.rounds(key, tool)),
                ])  # fmt: skip
        return [
            "## 4. Peak-memory accuracy",
            "",
            "A task touches N MiB (`b\"x\" * N MiB`) and returns at once (< 10 ms after touching)"
            " or after holding it; *truth* is the task's own VmHWM, returned in its result;"
            " *reported* is `max_memory_used_in_gib` (× 1024). A 4 GiB limit is set for every"
            " tool, since GPM fills the field only under a limit. Error = reported − truth.",
            "",
            *_table(["tool", "touched", "returns", "truth MiB", "reported MiB", "error MiB",
                     "rounds"], rows),
        ]

    def timeout(self) -> list[str]:
        params = self.d["runs"].get("timeout", {}).get("params", {})
        cap = params.get("cap", 0)
        rows = []
        for tool in self.tools:
            na = self.na(tool, "timeout")
            if na:
                rows.append([self.label(tool), na, "", "", "", "", ""])
                continue
            rounds = self.d["runs"].get("timeout", {}).get("rounds", {}).get(tool, [])

            def cell(field, rounds=rounds):
                values = [r.get(field) for r in rounds if "survivors" in r]
                if not values:
                    return "n/a"
                if any(v is None for v in values):
                    alive = sum(1 for v in values if v is None)
                    return f"never (still alive after {cap:g} s, {alive}/{len(values)} rounds)"
                return _tri(values, 1)

            reported = sorted({str(r.get("reported_timed_out")) for r in rounds})
            stuck = sum(1 for r in rounds if r.get("tool_stuck"))
            rows.append([
                self.label(tool), cell("task_ms"), cell("grandchild_ms"), cell("last_ms"),
                "/".join(reported) + (f"; tool hung in {stuck} rounds" if stuck else ""),
                _tri(self.v("timeout", tool, "entry_lag_ms"), 1), str(len(rounds)),
            ])  # fmt: skip
        return [
            f"## 5. Timeout enforcement: the whole tree, timeout {params.get('timeout')} s",
            "",
            "The task ignores SIGTERM, starts `sleep 300` in its own session"
            " (`subprocess.Popen(..., start_new_session=True)`) and hangs. The tool runs in a"
            " forked child of the measuring process, which polls both pids every millisecond"
            " (`/proc/PID/stat`; a zombie counts as gone). Milliseconds from the deadline until"
            " the process is gone. The deadline is the earlier of the task function's own entry"
            " time + timeout and the tool's reported `start_time` + timeout (GPM, sandboxrun;"
            " pebble reports none), so no latency is understated; the last column is how long"
            " after that clock start the function was entered (process start and, for"
            f" sandboxrun, entering the cgroups; negative for GPM, which reads its clock after"
            f" `Process.start()` returns). Waiting is capped at {cap:g} s, then the benchmark"
            " kills the two pids itself.",
            *self._entry_note(),
            "",
            *_table(["tool", "task gone ms", "grandchild gone ms", "last gone ms",
                     "timed_out reported", "task entered ms after clock start", "rounds"],
                    rows),
        ]

    def _entry_note(self) -> list[str]:
        lag = self.med("timeout", "sandboxrun-cgroup_v1", "entry_lag_ms")
        idle = self._floor("cgroup_v1", "idle_enter_ms")
        warm = self._floor("cgroup_v1", "fork_enter_exit_ms")
        if not lag or not idle or not warm:
            return []
        return [
            "",
            f"On `cgroup_v1` a lone task's function starts {lag:.0f} ms (median) after the"
            " timeout clock: the worker moves itself into 5 cgroups first, and the first"
            " migration after a quiet moment waits for an RCU grace period (the kernel's"
            " `cgroup_threadgroup_rwsem`): the floor table measures fork + enter + exit at"
            f" {statistics.median(idle):.1f} ms after 0.3 s idle against"
            f" {statistics.median(warm):.1f} ms back to back. Throughput runs stay warm; a"
            " single task pays it, and its timeout includes it.",
        ]

    def bigresult(self) -> list[str]:
        params = self.d["runs"].get("bigresult", {}).get("params", {})
        gpm_t = self.med("bigresult", "glasswall", "delivery_s")
        rows = []
        for tool in self.tools:
            delivery = self.v("bigresult", tool, "delivery_s")
            rows.append([
                self.label(tool), _tri(delivery, 3),
                _ratio(statistics.median(delivery) if delivery else None, gpm_t, inverse=True),
                _tri(self.v("bigresult", tool, "parent_peak_mib"), 0),
                _tri(self.v("bigresult", tool, "parent_base_mib"), 0),
                _tri(self.v("bigresult", tool, "children_peak_mib"), 0),
                str(self.rounds("bigresult", tool)), _errors(self.d, "bigresult", tool),
            ])  # fmt: skip
        size = params.get("size", 0) / MIB
        return [
            f"## 6. A {size:.0f} MiB bytes result",
            "",
            f"The task builds `b\"x\" * {size:.0f} MiB` and returns `(time.monotonic(), data)`."
            " *Delivery*: from that timestamp until the result is in the caller's hands"
            " (pickling, transfer, unpickling, bookkeeping). *Parent peak*: `ru_maxrss` of the"
            " measuring process at the end (*base*: before the tool started); *largest child*:"
            " `ru_maxrss` of `RUSAGE_CHILDREN` (GPM's watcher holds its own copies).",
            "",
            *_table(["tool", "delivery s", "GPM ÷ tool", "parent peak MiB", "parent base MiB",
                     "largest child MiB", "rounds", "note"], rows),
        ]

    def scale(self) -> list[str]:
        keys = [k for k in self.d["runs"] if k.startswith("scale-")]
        rows = []
        for tool in self.tools:
            for key in keys:
                n = self.d["runs"][key]["params"]["n"]
                if tool not in self.d["runs"][key]["rounds"]:
                    why = self.d.get("scale_skipped", {}).get(tool)
                    if why:
                        rows.append([self.label(tool), f"{n}", why, "", "", ""])
                    continue
                per = self.v(key, tool, "per_task_ms")
                gpm = self.med(key, "glasswall", "per_task_ms")
                rows.append([
                    self.label(tool), f"{n}", _tri(per, 2),
                    _ratio(statistics.median(per) if per else None, gpm, inverse=True),
                    _tri(self.v(key, tool, "maxrss_mib"), 0), str(self.rounds(key, tool)),
                ])  # fmt: skip
        return [
            "## 7. Cost as work grows",
            "",
            "N trivial tasks, 2 workers: wall time ÷ N (*per-task overhead*), and the manager"
            " process's peak memory (`ru_maxrss`). Each tool gets as many rounds (up to"
            f" {self.d.get('rounds')}) as fit"
            f" in about {SCALE_BUDGET_S} s at its measured throughput.",
            "",
            *_table(["tool", "tasks", "ms per task", "GPM ÷ tool", "parent peak MiB", "rounds"],
                    rows),
        ]

    def floor(self) -> list[str]:
        fork = self._floor("fork", "per_task_ms")
        cg = self.d["floor"].get("cgroup_v1", [])
        rows = [["bare `os.fork()` + `os._exit(0)` + `waitpid`", _tri(fork, 3), "", ""]]
        unavailable = next((r["unavailable"] for r in cg if "unavailable" in r), None)
        if unavailable:
            rows.append(["cgroup v1 operations", f"n/a: {unavailable}", "", ""])
        elif cg:
            controllers = ", ".join(cg[0].get("controllers", []))
            rows += [
                [f"mkdir in each of {controllers}", _tri(self._floor("cgroup_v1", "mkdir_ms"), 3),
                 "", ""],
                ["fork; child writes `0` to each `cgroup.procs`, exits; waitpid",
                 _tri(self._floor("cgroup_v1", "fork_enter_exit_ms"), 3), "", ""],
                ["rmdir each", _tri(self._floor("cgroup_v1", "rmdir_ms"), 3), "", ""],
                [f"fork + enter + exit + waitpid after {cg[0].get('idle_s')} s idle (first"
                 " migration waits for an RCU grace period)",
                 _tri(self._floor("cgroup_v1", "idle_enter_ms"), 3), "", ""],
                ["**total per task** (median of the per-step medians)",
                 _tri(self._floor("cgroup_v1", "total_ms"), 3),
                 _tri(self._floor("cgroup_v1", "p90_total_ms"), 3),
                 _tri([1000 / x for x in self._floor("cgroup_v1", "total_ms")], 0)],
            ]  # fmt: skip
        if fork:
            rows[0][3] = _tri([1000 / x for x in fork], 0)
        n = cg[0].get("n") if cg else None
        return [
            "## Physical floor on this kernel",
            "",
            "Measured in the same run, in fresh interpreters, one operation at a time (no"
            f" manager, no Python in the child): {n} cgroup rounds per measurement. The cgroup"
            " directories are made only below this process's own cgroups (as `/proc/self/cgroup`"
            " says) and all removed again.",
            "",
            *_table(["operation per task", "ms (median)", "p90 ms", "tasks/s if serial"], rows),
        ]


def plots(data: dict, out: Path) -> str | None:
    """The two PNGs; None when done, else why they were skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = Report(data, {}, False)
    tools = [t for t in report.tools if report.v("throughput", t, "tasks_per_s")]
    names, meds, lows, highs, colours = [], [], [], [], []
    for tool in tools:
        values = report.v("throughput", tool, "tasks_per_s")
        names.append(SHORT[tool])
        med = statistics.median(values)
        meds.append(med)
        lows.append(med - min(values))
        highs.append(max(values) - med)
        colours.append("tab:green" if tool.startswith("sandboxrun") else "tab:grey")
    for name, field in (("fork floor", "per_task_ms"), ("cgroup_v1", "total_ms")):
        values = [1000 / x for x in report._floor(name.split()[0], field)]
        if values:
            names.append({"fork floor": "floor:\nbare fork", "cgroup_v1": "floor: fork +\n"
                          "cgroup v1 ops"}[name])  # fmt: skip
            med = statistics.median(values)
            meds.append(med)
            lows.append(med - min(values))
            highs.append(max(values) - med)
            colours.append("tab:blue")
    fig, ax = plt.subplots(figsize=(10, 5))
    bars = ax.bar(range(len(names)), meds, yerr=[lows, highs], color=colours, capsize=4)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("tasks per second (log scale)")
    ax.set_title("Trivial tasks, fresh process per task, 2 workers (median, min–max)")
    for bar, value in zip(bars, meds, strict=True):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "bench-throughput.png", dpi=110)
    plt.close(fig)

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
    fig.savefig(out / "bench-memory-limit.png", dpi=110)
    plt.close(fig)
    return None


# =============================================================================== entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        tool, case, params = argv[1], argv[2], json.loads(argv[3])
        try:
            result = one(tool, case, params)
        except BaseException as error:
            result = {"error": f"{type(error).__name__}: {error}"[:300]}
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
        os._exit(0)  # no exit-time joins of leftover children
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, seconds")
    parser.add_argument("--only", help="comma-separated: sandboxrun, glasswall, pebble, ppe, or "
                        "sandboxrun-BACKEND")  # fmt: skip
    docs = Path(__file__).resolve().parent.parent / "docs"
    parser.add_argument("--out", type=Path, default=docs,
                        help="where benchmarks.md and the PNGs go (default: docs/)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--json", type=Path, help="also save the raw measurements here")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a running qemu VM before a full run")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="measure nothing: rewrite the report and plots from a --json file")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",")] if args.only else None
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_report(saved["data"], saved["meta"], args.out, saved["meta"].get("quick", False))
        return 0

    notes: list[str] = []
    # A SIGTERM (e.g. `kill` of a long run) still removes the temporary copy below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    snapshot_dir = tempfile.TemporaryDirectory(prefix="bench-sandboxrun-")
    snapshot = snapshot_sandboxrun(Path(snapshot_dir.name))
    # The measuring processes import this file as a module, with its bytecode cached.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).resolve().parent)])
    )
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(snapshot_dir.name) / "pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    runner_ = Runner(args, notes)
    if runner_.guard:
        waited = wait_for_quiet_machine(notes)
        if waited:
            notes.append(f"waited {waited:.0f} s for a qemu VM (another engineer's tests) first")
        runner_.waited = waited
    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data = runner_.run()
    if runner_.waited or runner_.redone:
        notes.append(
            f"qemu VMs (other engineers' tests): {runner_.waited:.0f} s waited in all;"
            f" measurements that overlapped one and were taken again: {runner_.redone}"
        )
    snapshot_dir.cleanup()
    meta = _machine() | {
        "sandboxrun_snapshot": snapshot,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "duration_s": time.monotonic() - started,
        "notes": notes,
    }
    meta["quick"] = args.quick
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "data": data}, indent=1))
    write_report(data, meta, args.out, args.quick)
    return 0


def write_report(data: dict, meta: dict, out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    skipped = plots(data, out)
    data["plots"] = skipped is None
    notes = [n for n in meta.get("notes", []) if not n.startswith("plots skipped")]
    if skipped:
        notes.append(f"plots skipped: {skipped}")
    (out / "benchmarks.md").write_text(Report(data, meta | {"notes": notes}, quick).render())
    print(f"wrote {out / 'benchmarks.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
