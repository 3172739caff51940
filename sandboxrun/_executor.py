"""``SandboxExecutor``: the ``concurrent.futures.Executor`` face of a ``ProcessManager``.

One background thread owns the manager and runs its scheduler loop; every other thread only
touches the executor's inbox (under a lock) and then writes a byte to the wake-up socket, which
the loop has in its selector::

    submit() --lock--> _inbox --(free slot: set_running_or_notify_cancel)--> manager.queue_task
    kill()   --lock--> _kills -------------------------------------------> scheduler.cancel
        \\___ wake-up byte: select() returns, the loop drains it and takes both lists
    manager.as_completed() --TaskResult--> future.task_result; set_result / set_exception

Tasks go to the manager only when a slot is free, so a future stays PENDING (cancellable, as
the stdlib promises) until its process is about to start, and RUNNING (not cancellable) from
then on. ``kill()`` is the extra the asyncio side needs: it kills a running task's tree.

Why not ``start_method="fork"``: the loop forks from a non-main thread while the caller's other
threads may hold locks (logging, imports, allocators): the child can deadlock on the first
(CPython gh-90622). The executor refuses it. On Linux the default start method is the zygote:
the manager never forks (a single-threaded zygote per slot does, started with ``subprocess``,
whose fork+exec is thread-safe), so the hazard does not arise; where the default is fork, the
executor uses forkserver (a single-threaded server forks the workers) or else spawn.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import multiprocessing
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from ._launch import StartMethod
from ._manager import BackendName, ProcessManager
from ._task import Task, TaskResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._backends.base import Backend
    from ._isolation import Isolation

log = logging.getLogger("sandboxrun.executor")


class ManagerOptions(TypedDict, total=False):
    """The keyword options of ``ProcessManager`` (same names, same meanings)."""

    worker_timeout_seconds: float | None
    memory_limit_in_gib: float | None
    cpu_time_limit_seconds: float | None
    max_processes: int | None
    backend: BackendName | Backend
    start_method: StartMethod | None
    poll_interval_seconds: float
    allowed_result_types: Iterable[type]
    trusted_results: bool
    max_result_bytes: int | None
    cpu_quota: float | None
    env: Mapping[str, str] | None
    isolation: Literal["none", "default", "strict"] | Isolation | None


class SandboxFuture(concurrent.futures.Future[Any]):
    """A ``Future`` that also carries its ``Task`` and, once done, its full ``TaskResult``.

    ``task_result`` is None until the future is done, and stays None only for a future that
    was cancelled before it ran.
    """

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task
        self.task_result: TaskResult | None = None


def task_result(future: concurrent.futures.Future[Any]) -> TaskResult | None:
    """The ``TaskResult`` behind a future of a ``SandboxExecutor`` (None: not done, or
    cancelled before it ran). Works on any future: a foreign one gives None."""
    return getattr(future, "task_result", None)


def _thread_safe_start_method(manager: ProcessManager) -> StartMethod | None:
    """The start method to rebuild the manager with, or None when its own is safe."""
    if manager.start_method != "fork":
        return None
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _preload_worker_in_forkserver() -> None:
    """Have the forkserver import the worker module once, before it forks the workers.

    Otherwise every worker imports sandboxrun (and psutil) itself after the fork: measured
    7.8 tasks/s instead of 59 on the bench machine (scripts/bench/scaleout.py). Only takes
    effect before the interpreter's forkserver starts; the modules already listed stay.
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    modules = list(getattr(server, "_preload_modules", None) or ["__main__"])
    if _WORKER_MODULE not in modules:
        forkserver.set_forkserver_preload([*modules, _WORKER_MODULE])


_WORKER_MODULE = "sandboxrun._worker"


class SandboxExecutor(concurrent.futures.Executor):
    """Run each submitted call in a fresh sandboxed process, as ``ProcessManager`` does.

    ``SandboxExecutor(max_workers, **options)`` takes the ``ProcessManager`` options
    (``worker_timeout_seconds``, ``memory_limit_in_gib``, ``backend``...). ``future.result()``
    returns the call's value or raises its exception: the task's own (its traceback text as
    ``__cause__``, a ``RemoteTraceback``), or the limit's (``TimeoutError``, ``MemoryError``,
    ``CpuTimeLimitExceeded``, ``WorkerDied``...). ``future.task_result`` (or
    ``sandboxrun.task_result(future)``) is the full ``TaskResult``.

    ``start_method="fork"`` is refused (forking from the executor's thread is unsafe); the
    default is the manager's, unless that is fork: then forkserver (spawn where there is none).
    """

    def __init__(self, max_workers: int | None = None, **options: Unpack[ManagerOptions]) -> None:
        if options.get("start_method") == "fork":
            raise ValueError(
                "SandboxExecutor cannot use start_method='fork': it starts workers from its own"
                " thread, and a fork while other threads hold locks can deadlock the child"
                " (CPython gh-90622); use 'forkserver' or 'spawn', or ProcessManager for fork"
            )
        manager = ProcessManager(max_workers, **options)
        safer = _thread_safe_start_method(manager)
        if safer is not None:  # reuse the backend just made: it may have probed cgroupfs
            rebuilt = cast(ManagerOptions, {**options, "start_method": safer})
            rebuilt["backend"] = manager.backend
            manager = ProcessManager(max_workers, **rebuilt)
        if manager.start_method == "forkserver":
            _preload_worker_in_forkserver()
        self._manager = manager
        self.max_workers = manager.max_workers
        self.start_method = manager.start_method
        self.backend = manager.backend
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inbox: list[SandboxFuture] = []
        self._kills: list[SandboxFuture] = []
        self._running: dict[int, SandboxFuture] = {}  # id(task) -> future, in the manager
        self._shutdown = False
        self._broken: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        # The manager's scheduler is this module's to drive, from the loop thread only.
        self._scheduler = manager._scheduler
        self._scheduler.set_wakeup(self._wake_r.fileno(), self._on_wakeup)
        self._thread = threading.Thread(target=self._loop, name="sandboxrun-executor", daemon=True)
        self._thread.start()
        _live.add(self)  # one atexit hook for all, not one per executor (run_async makes many)

    # ------------------------------------------------------------------ the caller's side

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> SandboxFuture:
        """Schedule ``fn(*args, **kwargs)`` in a fresh sandboxed process."""
        return self.submit_task(Task(fn, args, kwargs))

    def submit_task(self, task: Task) -> SandboxFuture:
        """Schedule a ``Task`` (a ``CommandTask`` too); ``result.task`` is this object."""
        if not isinstance(task, Task):
            raise TypeError(f"submit_task takes a Task, got {type(task).__name__}")
        future = SandboxFuture(task)
        with self._lock:
            if self._broken is not None:
                raise concurrent.futures.BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._inbox.append(future)
            self._idle.notify()
        self._wake()
        return future

    def kill(self, future: concurrent.futures.Future[Any]) -> None:
        """Cancel a pending future, or kill a running one's process tree: its result is then
        a ``TaskCancelled`` failure. Does nothing to a finished future. Returns at once."""
        if not isinstance(future, SandboxFuture) or future.cancel() or future.done():
            return
        with self._lock:
            self._kills.append(future)
            self._idle.notify()
        self._wake()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            dropped, self._inbox = (self._inbox, []) if cancel_futures else ([], self._inbox)
            self._idle.notify()
        for future in dropped:  # outside the lock: a done-callback may call submit (and fail)
            future.cancel()
        self._wake()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ the loop's thread

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                for result in self._manager.as_completed():
                    self._deliver(result)
                    self._take_inbox()
        except BaseException as error:  # the manager itself failed: no future may hang
            log.exception("the executor's loop failed; every unfinished future fails with it")
            self._break(f"the executor's loop failed: {type(error).__name__}: {error}", error)
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _wait_for_work(self) -> bool:
        """Queue what came in; sleep while there is nothing. False: shut down and idle."""
        while True:
            self._take_inbox()
            if self._running:
                return True
            with self._lock:
                if not self._inbox and not self._kills:
                    if self._shutdown:
                        return False
                    self._idle.wait()

    def _on_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass
        self._take_inbox()

    def _take_inbox(self) -> None:
        with self._lock:
            kills, self._kills = self._kills, []
            room = max(0, self.max_workers - len(self._running))
            starting: list[SandboxFuture] = []
            while self._inbox and len(starting) < room:
                future = self._inbox.pop(0)
                if future.set_running_or_notify_cancel():  # False: it was cancelled
                    starting.append(future)
        for future in kills:
            if not self._scheduler.cancel(future.task):
                log.debug("%r: kill asked when it was not running", future.task)
        for future in starting:
            self._start(future)

    def _start(self, future: SandboxFuture) -> None:
        try:
            self._manager.queue_task(future.task)  # pickles it (spawn/forkserver): may fail
        except Exception as error:
            future.task_result = TaskResult(task=future.task, success=False, exception=error)
            future.set_exception(error)
            return
        self._running[id(future.task)] = future

    def _deliver(self, result: TaskResult) -> None:
        future = self._running.pop(id(result.task))
        future.task_result = result
        if result.success:
            future.set_result(result.result)
        else:
            future.set_exception(result.exception)

    def _break(self, why: str, error: BaseException) -> None:
        with self._lock:
            self._broken = why
            futures = [*self._inbox, *self._running.values()]
            self._inbox.clear()
            self._running.clear()
        for future in futures:
            if future.done():
                continue
            failure = concurrent.futures.BrokenExecutor(why)
            failure.__cause__ = error
            if future.running() or future.set_running_or_notify_cancel():
                future.set_exception(failure)


_live: weakref.WeakSet[SandboxExecutor] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    """Like the stdlib executors, one never shut down finishes its queued work at exit."""
    for executor in list(_live):
        executor.shutdown(wait=True)
