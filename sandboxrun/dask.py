"""Sandboxed tasks on a Dask distributed cluster (``pip install 'sandboxrun[dask]'``).

Dask decides *where* a call runs; sandboxrun decides *how*: on the worker Dask picks, the call
runs in a fresh process under that machine's own backend and limits, through one
``SandboxExecutor`` per Dask worker process (made on first use, kept for the process's life)::

    client.submit(sandboxed(fn, **limits), x, pure=False)
        --Dask--> worker thread: Sandboxed.__call__ --submit--> SandboxExecutor (this worker)
                  --fresh process, cgroup limits--> TaskResult
        <--Dask-- the value, or the task's exception (TimeoutError, MemoryError, ...)
    sandboxed_result(fn, **limits): the whole TaskResult instead (a failure is a result)

A limit violation is an ordinary result or exception of the Dask task: the process that hit it
is a child of the Dask worker, never the worker itself, so Dask sees no worker crash. A worker
that dies for another reason mid-task is Dask's business: it reruns the task elsewhere (up to
``distributed.scheduler.allowed-failures``, then ``KilledWorker``).

The function must be importable on the workers (module level: the worker hands it to a fresh
process by reference, as under spawn). The limits travel as names and numbers: pass
``backend="auto"`` or a backend name, not a ``Backend`` instance. What comes back is trusted by
the client as any Dask result is; the task's own result crossed sandboxrun's restricted
unpickler on the worker first (docs/security.md).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._executor import ManagerOptions, SandboxExecutor
from ._task import Task, TaskResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Sandboxed", "run_task", "sandboxed", "sandboxed_result"]

_executors: dict[str, SandboxExecutor] = {}
_executors_lock = threading.Lock()


def _executor(max_workers: int | None, options: ManagerOptions) -> SandboxExecutor:
    """This worker process's executor for these limits (one per distinct set of limits)."""
    key = repr((max_workers, sorted(options.items())))
    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            "this Dask worker is a daemonic process, which may not start the sandboxed"
            " processes: start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False in their"
            " environment (or distributed.worker.daemon: false in the Dask config), or with"
            " dask worker --no-nanny"
        )
    with _executors_lock:
        executor = _executors.get(key)
        if executor is None:
            executor = _executors[key] = SandboxExecutor(max_workers, **options)
        return executor


def run_task(task: Task, max_workers: int | None, options: ManagerOptions) -> TaskResult:
    """Run ``task`` sandboxed in this (Dask worker) process; its ``TaskResult``, never raises
    for what the task did. What ``sandboxrun batch --scheduler`` submits for each file."""
    future = _executor(max_workers, options).submit_task(task)
    concurrent.futures.wait([future])
    if future.task_result is None:  # cancelled while pending: only a shutdown does that
        error = concurrent.futures.CancelledError("the worker's executor was shut down")
        return TaskResult(task=task, success=False, exception=error)
    return future.task_result


class Sandboxed:
    """A picklable callable for Dask: calls ``fn`` in a fresh sandboxed process on the worker.

    ``max_workers`` bounds the sandboxed processes at once per Dask worker process (default:
    its usable CPUs; Dask's own ``--nthreads`` bounds the calls it hands over).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        full_result: bool = False,
        max_workers: int | None = None,
        options: ManagerOptions | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"sandboxed() takes a callable, got {type(fn).__name__}")
        if options and not isinstance(options.get("backend", "auto"), str):
            raise TypeError("on Dask, backend must be a name ('auto', 'cgroup_v2'...): each"
                            " worker makes its own; a Backend instance cannot travel")  # fmt: skip
        self.fn = fn
        self.full_result = full_result
        self.max_workers = max_workers
        self.options: ManagerOptions = options or {}
        # Dask names its task keys after the function (dask.utils.funcname).
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = run_task(Task(self.fn, args, kwargs), self.max_workers, self.options)
        if self.full_result:
            return result
        if not result.success:
            assert result.exception is not None  # a failed TaskResult always says why
            raise result.exception
        return result.result

    def __repr__(self) -> str:
        return f"sandboxed({self.__name__}, {self.options!r})"


def sandboxed(
    fn: Callable[..., Any], max_workers: int | None = None, **options: Unpack[ManagerOptions]
) -> Sandboxed:
    """``fn`` wrapped to run sandboxed on a Dask worker: the call returns its value or raises
    its exception (``TimeoutError``, ``MemoryError``, ``WorkerDied``, the task's own)::

        safe = sandboxed(convert, worker_timeout_seconds=30, memory_limit_in_gib=2)
        futures = client.map(safe, paths, pure=False)
    """
    return Sandboxed(fn, max_workers=max_workers, options=options)


def sandboxed_result(
    fn: Callable[..., Any], max_workers: int | None = None, **options: Unpack[ManagerOptions]
) -> Sandboxed:
    """As ``sandboxed``, but the call returns the whole ``TaskResult`` (and never raises for
    what the task did: a limit or the task's exception is in ``result.exception``)."""
    return Sandboxed(fn, full_result=True, max_workers=max_workers, options=options)
