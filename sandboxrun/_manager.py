"""``ProcessManager``: a fresh process per task, at most ``max_workers`` at once, one result each.

The public facade only: it validates the arguments, queues tasks (pickling them here when the
start method needs it, so a bad task fails at ``queue_task``), and runs the scheduler from
``start_tasks`` (which the with-block calls on exit) or ``as_completed``::

    queue_task --> Scheduler.pending --> Scheduler.results() --> task_results / as_completed
                                          (_scheduler: event loop; _launch: start a worker;
                                           _outcome: frame -> TaskResult)

A manager can be run again (queue more, another with-block or ``start_tasks``), as Glasswall's
can; only an abort (a ``KeyboardInterrupt`` or other non-``Exception`` in the with-body, or a
failure of the manager itself) ends its life.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

from ._backends import create_backend
from ._backends.base import Backend
from ._cpus import available_cpus
from ._errors import BackendUnavailable
from ._isolation import Isolation, build_environment, choose
from ._isolation.environment import validate as validate_env
from ._launch import ZYGOTE_AVAILABLE, Launcher, StartMethod, default_start_method
from ._limits import Limits, validate_max_result_bytes, validate_max_workers, validate_poll_interval
from ._outcome import Terms
from ._result_types import ResultTypes
from ._scheduler import Scheduler
from ._task import Task, TaskResult

BackendName = Literal["auto", "cgroup_v2", "systemd", "cgroup_v1", "psutil"]

log = logging.getLogger("sandboxrun.manager")


def _default_process_limit(limits: Limits, backend: Backend) -> Limits:
    """The default ``max_processes`` where this backend can enforce it. A backend that could
    but cannot here (cgroup v1 without a pids hierarchy) refuses every task that asks for a
    process limit: the default is dropped there, with a note, rather than fail every task."""
    if "processes" in backend.kernel_enforced or "processes" not in backend.enforceable:
        return limits  # the kernel's pids.max, or a polled count (psutil)
    log.info("no default max_processes: the %s backend cannot limit processes here (see"
             " `sandboxrun doctor`)", backend.name)  # fmt: skip
    return dataclasses.replace(limits, max_processes=None)


def _check_cpu_quota(limits: Limits, backend: Backend) -> None:
    if limits.cpu_quota is None or "cpu_quota" in backend.kernel_enforced:
        return
    raise BackendUnavailable(
        f"cpu_quota={limits.cpu_quota} is not available with the {backend.name} backend: a"
        " per-task CPU quota needs the kernel's CFS bandwidth control, a cgroup with the cpu"
        " controller (backends cgroup_v2, systemd, cgroup_v1; `sandboxrun doctor` says what"
        " this host has). The psutil monitor does not fake one with SIGSTOP/SIGCONT: a task"
        " could undo it"
    )


class ProcessManager:
    """Run each queued ``Task`` in a fresh process under kernel-enforced limits.

    Drop-in for the Glasswall process manager::

        with ProcessManager(None, worker_timeout_seconds=5, memory_limit_in_gib=4) as pm:
            for path in paths:
                pm.queue_task(Task(func=convert, args=(path,)))
        for result in pm.task_results:
            print(result)

    ``max_workers=None`` (or ``0``, as in Glasswall) means the CPUs this process may use
    (affinity and cgroup quota aware); ``worker_timeout_seconds`` and ``memory_limit_in_gib``
    of ``None`` or ``0`` mean no limit. Keyword-only extras: ``cpu_time_limit_seconds``
    (RLIMIT_CPU), ``max_processes`` (fork-bomb limit: processes and threads of one task at once,
    ``pids.max`` on the kernel backends; default ``sandboxrun._limits.DEFAULT_MAX_PROCESSES``, ``0``
    for no limit),
    ``backend`` (``"auto"``, ``"cgroup_v2"``, ``"systemd"``, ``"cgroup_v1"``, ``"psutil"``, or a
    ``Backend`` instance), ``start_method`` (``"zygote"``, ``"fork"``, ``"forkserver"``,
    ``"spawn"``; default: ``"zygote"`` on Linux, else multiprocessing's default),
    ``poll_interval_seconds`` (psutil backend only) and ``env`` (variables the tasks get on top
    of this process's environment, as under fork; ``strict`` keeps only an allowlist of it, see
    ``_isolation/environment.py``; every start method).

    The zygote (docs/guide.md, "Start methods"): a fresh interpreter per worker slot that forks
    each task into a PID namespace of its own; like spawn and forkserver (Python 3.14's POSIX
    default), tasks arrive pickled, so their functions must be importable. ``"fork"`` keeps
    closures and state built in ``main()`` working, at the price of the manager's heap, fds and
    environment in every task.

    ``cpu_time_limit_seconds`` counts the CPU of the whole process tree (the cgroup's counter,
    checked by the event loop; RLIMIT_CPU stays on each process as the kernel's floor).
    ``cpu_quota`` caps the CPUs a task may use at once (0.5 = half a CPU, over its whole tree;
    CFS bandwidth control, so the kernel backends only: a ``BackendUnavailable`` on psutil).

    Results cross a trust boundary (see docs/security.md): a result or exception may contain
    builtin value types and exception classes of modules the manager has imported, plus the
    classes in ``allowed_result_types``; anything else fails that task with
    ``ResultTypeRefused``. ``trusted_results=True`` restores full pickle (a task can then run
    code in the manager). ``max_result_bytes`` caps one result's pickled size (default: the
    memory limit, or 1 GiB without one); a longer one fails with ``ResultTooLarge`` unread.

    ``isolation`` (Linux, the zygote start method; docs/security.md): ``"default"`` (the
    default where it works: a task gets what it was handed -- an unprivileged uid per worker
    slot, the paths its call names and the working folder mounted so it acts on them as this
    process would, everything else as any local user meets it; own PID/mount/IPC/cgroup
    namespaces, a private ``/dev``, no terminal, no capabilities, ``no_new_privs``, a seccomp
    filter, this process's environment), ``"strict"`` (all of ``/`` read-only but
    ``Isolation.read_write_paths``, a private ``/tmp``, no network, an allowlisted environment,
    nothing handed), ``"none"`` (tasks share this process's privileges; the only choice for
    the fork, spawn and forkserver start methods), or an ``Isolation`` built piece by piece.

    A limit hit shows in the task's ``TaskResult``: ``success=False`` and the flag of that
    limit (``timed_out``, ``out_of_memory``, ``cpu_time_limit_exceeded``,
    ``process_limit_exceeded``), with ``exception`` saying which (``TimeoutError``,
    ``MemoryError``, ``CpuTimeLimitExceeded``, ``ProcessLimitExceeded`` whose ``__cause__`` is
    what the task itself raised, e.g. ``RuntimeError: can't start new thread``). A task whose
    worker could not even start (a memory limit too small for it, a zygote that died) gets a
    failed ``TaskResult`` too (``exit_code`` None), never an exception out of the with-block.

    Diagnostics go to ``logging.getLogger("sandboxrun")``: a debug line per launch and kill, a
    warning for each error survived (e.g. counters that could not be read).
    """

    def __init__(
        self,
        max_workers: int | float | None = None,
        worker_timeout_seconds: float | None = None,
        memory_limit_in_gib: float | None = None,
        *,
        cpu_time_limit_seconds: float | None = None,
        max_processes: int | None = None,
        backend: BackendName | Backend = "auto",
        start_method: StartMethod | None = None,
        poll_interval_seconds: float = 0.05,
        allowed_result_types: Iterable[type] = (),
        trusted_results: bool = False,
        env: Mapping[str, str] | None = None,
        max_result_bytes: int | None = None,
        cpu_quota: float | None = None,
        isolation: Literal["none", "default", "strict"] | Isolation | None = None,
    ) -> None:
        workers = validate_max_workers(max_workers)
        poll_interval_seconds = validate_poll_interval(poll_interval_seconds)
        self.limits = Limits.from_arguments(
            worker_timeout_seconds, memory_limit_in_gib, cpu_time_limit_seconds, max_processes,
            cpu_quota,
        )  # fmt: skip
        methods = (["zygote"] if ZYGOTE_AVAILABLE else []) + multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
        self.max_workers: int = workers or available_cpus()
        # As given (0 stays 0, as Glasswall reports it in TaskResult.timeout_seconds); the
        # enforced limits, with 0 read as "none", are in self.limits.
        self.worker_timeout_seconds = worker_timeout_seconds
        self.memory_limit_in_gib = memory_limit_in_gib
        self.cpu_time_limit_seconds = cpu_time_limit_seconds
        self.max_processes = max_processes  # None: the default; in force: limits.max_processes
        self.start_method: StartMethod = start_method or default_start_method()
        self.env = validate_env(env)
        self.backend: Backend = (
            backend
            if isinstance(backend, Backend)
            else create_backend(backend, poll_interval_seconds=poll_interval_seconds)
        )
        _check_cpu_quota(self.limits, self.backend)
        if max_processes is None:
            self.limits = _default_process_limit(self.limits, self.backend)
        self.isolation: Isolation = choose(isolation, self.start_method, start_method is not None)
        self.task_results: list[TaskResult] = []
        memory = self.limits.memory_bytes
        self.max_result_bytes = validate_max_result_bytes(max_result_bytes, memory)
        result_types = ResultTypes(allowed_result_types, trusted=trusted_results)
        terms = Terms(
            limits=self.limits,
            worker_timeout_seconds=worker_timeout_seconds,
            memory_limit_in_gib=memory_limit_in_gib,
            cpu_time_limit_seconds=cpu_time_limit_seconds,
            max_processes=self.limits.max_processes,
            backend=self.backend.name,
            memory_hit_known="memory" in self.backend.kernel_enforced,
            cpu_time_known="cpu_time" in self.backend.kernel_enforced,
            result_types=result_types,
            max_result_bytes=self.max_result_bytes,
            isolation=self.isolation.name,
        )
        kernel = self.backend.kernel_enforced
        launcher = Launcher(
            self.start_method,
            self.backend.worker_options,
            self.max_result_bytes,
            build_environment(self.isolation, self.env),
            self.isolation,
            # tmpfs pages are charged to the task's memory cgroup; the psutil monitor sees
            # no /dev/shm, so there the private one is as big as the memory limit.
            shm_bytes=None if "memory" in kernel else self.limits.memory_bytes,
            # Where the kernel does not count a task's processes (psutil: polled), tasks running
            # as a uid of their own also get RLIMIT_NPROC: nothing to outrun between two polls.
            process_rlimit=None if "processes" in kernel else self.limits.max_processes,
        )
        self._scheduler = Scheduler(self.backend, launcher, terms, self.max_workers)
        self._aborted_by: str | None = None  # set once: why this manager was aborted

    def __enter__(self) -> ProcessManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # KeyboardInterrupt, SystemExit...: Ctrl-C must stop the program now, not after
            # every queued conversion has run.
            self._abort(exc_type.__name__)
            return
        if self._aborted_by is not None:  # as_completed already aborted (the manager failed)
            return
        # Normal exit, or an ordinary Exception in the body: like Glasswall (and
        # concurrent.futures, whose __exit__ waits for submitted work), every queued task still
        # runs and task_results is filled before the body's exception propagates.
        self.start_tasks()

    def queue_task(self, task: Task) -> None:
        """Add a task. Under spawn/forkserver it must pickle; that is checked here, not later."""
        if not isinstance(task, Task):
            raise TypeError(f"queue_task takes a Task, got {type(task).__name__}")
        self._check_usable("queue_task")
        payload = b""
        if self.start_method != "fork":
            try:
                payload = pickle.dumps(task, protocol=5)
            except Exception as error:
                raise TypeError(
                    f"{task!r} cannot be sent to a worker under start method "
                    f"{self.start_method!r}: {type(error).__name__}: {error}. Define the function "
                    "at module level and pass picklable arguments, or use start_method='fork'."
                ) from error
        self._scheduler.pending.append((task, payload))

    def start_tasks(self) -> None:
        """Run every queued task to its end and append the results to ``task_results``.

        What the with-block does on exit; public, as in Glasswall (queue, ``start_tasks()``,
        read ``task_results``). May be called again after more tasks are queued: the new
        results are appended, the earlier ones stay.
        """
        self._check_usable("start_tasks")
        try:
            for result in self._scheduler.results():
                self.task_results.append(result)
        except BaseException as error:
            self._abort(type(error).__name__)
            raise
        finally:
            self._scheduler.close()

    def as_completed(self) -> Iterator[TaskResult]:
        """Start processing and yield each result as its task ends (not added to
        ``task_results``).

        Leaving the loop early loses nothing: the remaining tasks finish on exit of the
        with-block (or the next ``start_tasks``) and land in ``task_results``.
        """
        self._check_usable("as_completed")
        try:
            yield from self._scheduler.results()
        except GeneratorExit:  # the caller left the loop: the rest run later, nothing is lost
            raise
        except BaseException as error:  # Ctrl-C in the wait, or the manager itself failed
            self._abort(type(error).__name__)
            raise
        self._scheduler.close()

    def _check_usable(self, what: str) -> None:
        if self._aborted_by is not None:
            raise RuntimeError(
                f"{what} on an aborted ProcessManager: a {self._aborted_by} stopped it, its"
                " running tasks were killed and its queue dropped; make a new ProcessManager"
            )

    def _abort(self, why: str) -> None:
        if self._aborted_by is None:
            self._aborted_by = why
        self._scheduler.abort()
