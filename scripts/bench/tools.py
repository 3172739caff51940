"""The tools under test and their adapters.

Each adapter runs a batch of ``(function, args)`` with 2 workers and a fresh process per task,
and returns one outcome dict per task: success, result, error, timed_out, oom, max_mem_gib,
exit_code, start_time, t_got (``time.monotonic()`` when the result reached this process).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

SANDBOXRUN_BACKENDS = ("cgroup_v2", "cgroup_v1", "psutil")
PEERS = ("glasswall", "pebble", "ppe")
# The restricted result decoding's cost: this backend again with trusted_results=True, only in
# the cases the security section compares (docs/security.md).
TRUSTED = "sandboxrun-trusted"
TRUSTED_TWIN = "cgroup_v1"
TRUSTED_CASES = ("throughput", "bigresult")
LABELS = {
    "sandboxrun-cgroup_v2": "sandboxrun (cgroup_v2)",
    "sandboxrun-cgroup_v1": "sandboxrun (cgroup_v1)",
    "sandboxrun-psutil": "sandboxrun (psutil)",
    "sandboxrun-trusted": "sandboxrun (cgroup_v1, trusted_results=True)",
    "sandboxrun-fork": "sandboxrun (cgroup_v1, start_method=\"fork\": before the zygote)",
    "glasswall": "Glasswall manager 5.12",
    "pebble": "pebble ProcessPool(max_tasks=1)",
    "ppe": "ProcessPoolExecutor(forkserver, max_tasks_per_child=1)",
}
SHORT = {  # for the plots
    "sandboxrun-cgroup_v2": "sandboxrun\ncgroup_v2",
    "sandboxrun-cgroup_v1": "sandboxrun\ncgroup_v1",
    "sandboxrun-psutil": "sandboxrun\npsutil",
    "sandboxrun-trusted": "sandboxrun\ntrusted",
    "sandboxrun-fork": "sandboxrun\nfork",
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
CANNOT.update(
    ((TRUSTED, case), "only the security comparison's cases (throughput, bigresult)")
    for case in ("scale", "cpu", "strict", "peak", "timeout", "profile")
)
# The launcher before the zygote: only in the launcher comparison (section 9) and throughput.
FORK = "sandboxrun-fork"
CANNOT.update(
    ((FORK, case), "only the launcher comparison (section 9) and throughput")
    for case in ("scale", "cpu", "strict", "peak", "timeout", "profile", "bigresult")
)
IMPORTS = {"glasswall": ("glasswall.multiprocessing",), "pebble": ("pebble",),
           "ppe": ("concurrent.futures", "multiprocessing")}  # fmt: skip
# sandboxrun's package imports its parts lazily, at the first manager: import them up front as
# the peers' are (a first manager otherwise pays ~45 ms of imports here, a one-time cost).
SANDBOXRUN_IMPORTS = ("sandboxrun", "sandboxrun._manager", "sandboxrun._scheduler",
                      "sandboxrun._launch", "sandboxrun._outcome", "sandboxrun._result_types",
                      "sandboxrun._backends.psutil_monitor")  # fmt: skip
SANDBOXRUN_LINUX_IMPORTS = ("sandboxrun._zygote.client", "sandboxrun._isolation",
                            "sandboxrun._backends.cgroup_v1_slot", "sandboxrun._backends.cgroup_v2",
                            "sandboxrun._backends.systemd")  # fmt: skip

Calls = Iterable[tuple[Callable[..., Any], tuple[Any, ...]]]
Outcome = dict[str, Any]
Run = Callable[..., list[Outcome]]


def outcome(**fields: Any) -> Outcome:
    fields.setdefault("t_got", time.monotonic())
    return fields


def _managed(manager: Any, task_class: Any, calls: Calls) -> list[Outcome]:
    """sandboxrun and GPM share the seed's API: queue_task, as_completed, TaskResult fields
    (GPM lacks some of them: None)."""
    outcomes = []
    with manager:
        for func, args in calls:
            manager.queue_task(task_class(func, args))
        for r in manager.as_completed():
            outcomes.append(
                outcome(
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


def run_sandboxrun(
    backend: str,
    calls: Calls,
    timeout: float | None = None,
    memory_gib: float | None = None,
    workers: int = 2,
    trusted: bool = False,
    start_method: str | None = None,
) -> list[Outcome]:
    from sandboxrun import ProcessManager, Task

    # start_method None: the default (the zygote on Linux, default isolation); another start
    # method runs without isolation (only the zygote isolates).
    isolation = None if start_method in (None, "zygote") else "none"
    manager = ProcessManager(workers, timeout, memory_gib, backend=backend,  # type: ignore[arg-type]
                             start_method=start_method, trusted_results=trusted,
                             isolation=isolation)  # fmt: skip
    return _managed(manager, Task, calls)


def run_glasswall(
    calls: Calls, timeout: float | None = None, memory_gib: float | None = None, workers: int = 2
) -> list[Outcome]:
    from glasswall.multiprocessing import GlasswallProcessManager, Task

    return _managed(GlasswallProcessManager(workers, timeout, memory_gib), Task, calls)


def _futures_outcomes(futures: list[Any]) -> list[Outcome]:
    import concurrent.futures

    outcomes = []
    for future in concurrent.futures.as_completed(futures):
        got = time.monotonic()
        try:
            outcomes.append(outcome(success=True, result=future.result(), error=None, t_got=got))
        except BaseException as error:
            outcomes.append(
                outcome(
                    success=False,
                    result=None,
                    error=repr(error)[:200],
                    timed_out=isinstance(error, TimeoutError),
                    t_got=got,
                )
            )
    return outcomes


def run_pebble(
    calls: Calls, timeout: float | None = None, memory_gib: float | None = None, workers: int = 2
) -> list[Outcome]:
    import warnings

    import pebble

    with pebble.ProcessPool(max_workers=workers, max_tasks=1) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            futures = [pool.schedule(func, args=args, timeout=timeout) for func, args in calls]
        outcomes = _futures_outcomes(futures)
    return outcomes


def run_ppe(
    calls: Calls, timeout: float | None = None, memory_gib: float | None = None, workers: int = 2
) -> list[Outcome]:
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(  # type: ignore[call-overload]  # 3.11+
        max_workers=workers, max_tasks_per_child=1, mp_context=context
    ) as executor:
        futures = [executor.submit(func, *args) for func, args in calls]
        outcomes = _futures_outcomes(futures)
    return outcomes


def runner(tool: str) -> Run:
    if tool == TRUSTED:  # the same backend as its restricted twin, full pickle: the ratio
        return functools.partial(run_sandboxrun, TRUSTED_TWIN, trusted=True)
    if tool == FORK:
        return functools.partial(run_sandboxrun, "cgroup_v1", start_method="fork")
    if tool.startswith("sandboxrun-"):
        backend = tool.split("-", 1)[1]
        return lambda *a, **k: run_sandboxrun(backend, *a, **k)
    return {"glasswall": run_glasswall, "pebble": run_pebble, "ppe": run_ppe}[tool]


def unavailable(tool: str) -> str | None:
    """None when ``tool`` can run here, else why not."""
    import importlib.util

    if tool.startswith("sandboxrun-"):
        if importlib.util.find_spec("sandboxrun") is None:
            return "sandboxrun is not installed"
        from sandboxrun import detect

        backend = TRUSTED_TWIN if tool in (TRUSTED, FORK) else tool.split("-", 1)[1]
        entry = detect()["backends"].get(backend)
        if entry is None or not entry["available"]:
            return f"backend unavailable here: {entry and entry['reason']}"
        return None
    module = {"glasswall": "glasswall", "pebble": "pebble", "ppe": "concurrent.futures"}[tool]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def select(only: list[str] | None) -> list[str]:
    """Every tool, or those ``--only`` names (``sandboxrun`` means all its backends)."""
    tools = [f"sandboxrun-{b}" for b in SANDBOXRUN_BACKENDS] + [TRUSTED, FORK] + list(PEERS)
    if only:
        wanted: set[str] = set()
        for name in only:
            wanted |= {t for t in tools if t == name or t.startswith(name + "-")}
        tools = [t for t in tools if t in wanted]
    return tools
