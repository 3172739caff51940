"""Beyond one manager: ``SandboxExecutor`` next to ``ProcessManager``, and Dask scale-out.

``case_executor``: the same ``n`` trivial tasks, 2 workers, through ``ProcessManager`` (fork,
the bench's launcher; and forkserver, the executor's) and through ``SandboxExecutor`` (its
default: forkserver, since it refuses fork), one after the other in one interpreter.

``case_dask``: ``n`` CPU-bound "conversions" (``cpu_s`` of CPU each) sent with
``sandboxrun.dask.sandboxed`` to a local cluster of one worker, then of two (one thread
each): the wall time ratio. On a 2-core machine two workers cannot exceed 2x.
"""

from __future__ import annotations

import time
from typing import Any

Params = dict[str, Any]
Result = dict[str, Any]


def burn(seconds: float) -> float:
    """A CPU-bound conversion: ``seconds`` of CPU time; module level, so workers import it."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return seconds


def _rate(n: int, run: Any) -> float:
    started = time.perf_counter()
    done = run()
    wall = time.perf_counter() - started
    if done != n:
        raise RuntimeError(f"{n - done} of {n} tasks failed")
    return n / wall


def case_executor(tool: str, p: Params) -> Result:
    import sandboxrun

    from .tasks import trivial

    n, backend = p["n"], tool.split("-", 1)[1]

    def manager(start_method: str) -> int:
        isolation = None if start_method == "zygote" else "none"  # only the zygote isolates
        with sandboxrun.ProcessManager(2, backend=backend, start_method=start_method,
                                       isolation=isolation) as pm:  # fmt: skip
            for i in range(n):
                pm.queue_task(sandboxrun.Task(trivial, (i,)))
        return sum(result.success for result in pm.task_results)

    def executor() -> int:
        with sandboxrun.SandboxExecutor(2, backend=backend) as pool:  # type: ignore[arg-type]
            return sum(1 for _ in pool.map(trivial, range(n)))

    executor()  # the forkserver (one per interpreter) starts outside the clock
    manager_fork = _rate(n, lambda: manager("fork"))
    manager_forkserver = _rate(n, lambda: manager("forkserver"))
    executor_rate = _rate(n, executor)
    return {
        "n": n,
        "manager_fork_tasks_per_s": manager_fork,
        "manager_forkserver_tasks_per_s": manager_forkserver,
        "executor_tasks_per_s": executor_rate,
        "executor_vs_manager_fork": executor_rate / manager_fork,
        "executor_vs_manager_forkserver": executor_rate / manager_forkserver,
    }


def _dask_wall(workers: int, n: int, cpu_s: float, backend: str) -> float:
    import dask
    import distributed

    from sandboxrun.dask import sandboxed

    # The nanny's worker must not be daemonic: it starts the sandboxed processes.
    with dask.config.set({"distributed.worker.daemon": False}), distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        memory_limit=0,
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        call = sandboxed(burn, backend=backend)  # type: ignore[arg-type]
        client.gather(client.map(call, [0.0] * workers, pure=False))  # warm: executors, imports
        started = time.perf_counter()
        results = client.gather(client.map(call, [cpu_s] * n, pure=False))
        wall = time.perf_counter() - started
    if len(results) != n:
        raise RuntimeError("tasks went missing")
    return wall


def case_dask(tool: str, p: Params) -> Result:
    n, cpu_s, backend = p["n"], p["cpu_s"], tool.split("-", 1)[1]
    one = _dask_wall(1, n, cpu_s, backend)
    two = _dask_wall(2, n, cpu_s, backend)
    return {
        "n": n,
        "cpu_s": cpu_s,
        "one_worker_s": one,
        "two_workers_s": two,
        "speedup": one / two,
        "ideal_s_one_worker": n * cpu_s,
    }


def section(sections: Any) -> list[str]:
    """The report's "Beyond one manager" section, when a run measured it (not --quick)."""
    from .figures import section as make_section
    from .figures import tri

    ours = sections.ours
    if not sections.v("executor", ours, "executor_tasks_per_s"):
        return []
    n = sections.params("executor").get("n")
    rows = [
        [label, tri(sections.v("executor", ours, field))]
        for label, field in (
            ("`ProcessManager`, fork (tasks/s)", "manager_fork_tasks_per_s"),
            ("`ProcessManager`, forkserver (tasks/s)", "manager_forkserver_tasks_per_s"),
            ("`SandboxExecutor` (forkserver; tasks/s)", "executor_tasks_per_s"),
            ("executor / manager fork", "executor_vs_manager_fork"),
            ("executor / manager forkserver", "executor_vs_manager_forkserver"),
        )
    ]
    dask = sections.params("dask")
    if dask:
        rows += [
            [f"Dask, 1 worker: {dask['n']} x {dask['cpu_s']} s CPU (s)",
             tri(sections.v("dask", ours, "one_worker_s"))],
            ["Dask, 2 workers (s)", tri(sections.v("dask", ours, "two_workers_s"))],
            ["Dask speed-up, 2 workers / 1 (at most 2x here)",
             tri(sections.v("dask", ours, "speedup"))],
        ]  # fmt: skip
    return make_section(
        "## 11. Beyond one manager: SandboxExecutor and Dask",
        f"{n} trivial tasks, 2 workers, {sections.label(ours)}, in one interpreter: the"
        " executor refuses fork (it starts workers from its own thread), so its fair twin is"
        " the manager under forkserver. Dask: CPU-bound tasks through"
        " `sandboxrun.dask.sandboxed` on a local cluster of one worker, then two (one thread"
        " each); on a 2-core machine the speed-up cannot exceed 2x.",
        header=["measurement", "value"],
        rows=rows,
    )
