"""Starting one worker: its pipes, its exit fd, the launcher, and the ``WorkerSpec`` it gets.

The launcher only starts the process and hands back a ``Job`` with its fds open; attaching it
to the sandbox, arming its clock and writing the go frame are the scheduler's (so this module
never needs the scheduler, and the outcome never needs either)::

    Launcher.launch(task, payload, sandbox, cpu_time_seconds, siblings)
        result pipe  (worker writes, we read; bigger pipe = fewer wake-ups)
        control pipe (only with a handshake: a task payload or a parent-side attach)
        process.start()  -- ZygoteChild (the default on Linux: a per-slot zygote forks the
                            task into its own PID namespace, see _zygote), ForkedProcess
                            (fork + pidfd) or multiprocessing's Process (spawn, forkserver)
        exit fd      (pidfd, else a dup of the multiprocessing sentinel)
      -> Job(result_fd, control_fd, exit_fd, go_frame ready to write or None)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, Literal, cast

from . import _protocol as protocol
from . import _transport as transport
from . import _worker
from ._backends.base import Sandbox, WorkerOptions
from ._isolation import NONE, Isolation
from ._job import Job
from ._task import Task
from ._worker import WorkerSpec

if sys.platform != "win32":
    from ._forked import ForkedProcess

if sys.platform == "linux" and transport.EXIT_BY_PIDFD:
    from ._zygote.client import ZygoteChild
    from ._zygote.server import Request

StartMethod = Literal["zygote", "fork", "forkserver", "spawn"]
#: The zygote needs pidfds (Linux 5.3) and the posix transport (its fds are real pipes).
ZYGOTE_AVAILABLE = sys.platform == "linux" and transport.EXIT_BY_PIDFD


def default_start_method() -> StartMethod:
    """A manager's start method when it names none: the transport's (the portable one:
    spawn), else the zygote where there is one, else multiprocessing's default."""
    if transport.DEFAULT_START_METHOD:
        return cast(StartMethod, transport.DEFAULT_START_METHOD)
    return "zygote" if ZYGOTE_AVAILABLE else cast(StartMethod, multiprocessing.get_start_method())

log = logging.getLogger("sandboxrun.launch")
#: TaskResult.isolation's note when a task kept the manager's uid (the zygote logs the path).
KEPT_UID_WHY = "a handed path's filesystem cannot be idmapped here, see `sandboxrun doctor`"


def _kill_started(process: Any) -> None:
    if getattr(process, "pid", None) is None:
        return
    with contextlib.suppress(OSError, ValueError):
        process.kill()
        process.join()
    log.debug("killed pid %s: its launch was interrupted", process.pid)


def _modules_of(task: Task) -> tuple[str, ...]:
    """The module the zygote imports before forking, so each task finds it loaded."""
    name = getattr(task.func, "__module__", None)
    return (name,) if isinstance(name, str) and name != "__main__" else ()


def _task_ids(isolation: Isolation, slot: int) -> tuple[int, int] | None:
    """The (uid, gid) the task of ``slot`` will run as, or None: the manager's."""
    if sys.platform == "linux":
        from ._isolation._privileges import task_ids

        return task_ids(isolation, slot)
    return None


class Launcher:
    """Chooses how workers start (once per manager) and starts one per call."""

    def __init__(
        self,
        start_method: StartMethod,
        options: WorkerOptions,
        max_result_bytes: int = protocol.DEFAULT_MAX_RESULT_BYTES,
        environment: dict[str, str] | None = None,
        isolation: Isolation = NONE,
        shm_bytes: int | None = None,
        process_rlimit: int | None = None,
    ) -> None:
        """``process_rlimit``: the max_processes a backend without a kernel process limit
        polls; tasks that run as a uid of their own also get it as RLIMIT_NPROC."""
        self.start_method = start_method
        self.process_rlimit = process_rlimit
        self.isolation = isolation
        self._shm_bytes = shm_bytes  # a private /dev/shm's size where no cgroup charges it
        self._slots: dict[int, int] = {}  # id(job) -> its worker slot (its uid under strict)
        self.options = options
        self.max_result_bytes = max_result_bytes  # each job's reader reads no longer a body
        self.environment = environment or {}  # the zygote's (and so every task's) environment
        self._zygote = start_method == "zygote"
        self.born_in_place = self._zygote  # tasks can be born in a slot's cgroups
        self._birthplaces: set[tuple[str, ...]] = set()
        self._context = None if self._zygote else multiprocessing.get_context(start_method)
        if start_method == "forkserver" and self._context is not None:
            # Else every worker imports sandboxrun after its fork (measured 7x slower). Only
            # takes effect before the process's forkserver starts.
            self._context.set_forkserver_preload(["sandboxrun._worker"])
        self._bare_fork = start_method == "fork" and transport.BARE_FORK
        # A forkserver child's parent is the server, not us: no pid to compare.
        self._manager_pid = None if start_method == "forkserver" else os.getpid()

    def _free_slot(self, siblings: Iterable[Job]) -> int:
        """The lowest slot no running job holds: tasks running at once never share a uid."""
        running = {id(job) for job in siblings}
        self._slots = {key: slot for key, slot in self._slots.items() if key in running}
        taken = set(self._slots.values())
        return next(slot for slot in range(len(taken) + 1) if slot not in taken)

    def prepare(
        self, sandboxes: list[Sandbox], work: list[tuple[Task, bytes]], free_slots: int = 0
    ) -> None:
        """Before launching ``work`` into these sandboxes: start the zygotes they need and have
        them import the tasks' modules, side by side. Where zygotes are not tied to a slot's
        cgroups, the other ``free_slots`` get theirs too: tasks that come one at a time (an
        executor's) then never wait for a start while others run."""
        if sys.platform == "linux" and self._zygote:
            from ._zygote.client import POOL

            modules = {name for task, _ in work for name in _modules_of(task)}
            needs_main = any(b"__main__" in payload for _, payload in work)
            birthplaces = [sandbox.birthplace or () for sandbox in sandboxes]
            if all(not place for place in birthplaces):
                birthplaces += [()] * free_slots
            POOL.warm(self.environment, birthplaces, modules, needs_main)

    def close(self) -> None:
        """End the zygotes that live in the backend's slots: it removes them next."""
        if sys.platform == "linux" and self._birthplaces - {()}:
            from ._zygote.client import POOL

            placed, self._birthplaces = self._birthplaces - {()}, set()
            POOL.discard(placed.__contains__)

    def _isolation_for(self, task: Task) -> Isolation:
        """The manager's profile plus the task's own ``read_write_paths``: each task gets only
        its own writable folders (a batch's staging folder), never its neighbours'. Every start
        method takes the profile from here (the zygote's request, the fork/spawn spec)."""
        extra = getattr(task, "read_write_paths", ())
        if not extra or not self.isolation.enabled:
            return self.isolation
        return self.isolation.with_paths(extra)

    def _handed(self, task: Task, isolation: Isolation) -> tuple[str, ...]:
        """What ``task``'s call hands it (``_isolation/handed.py``), where the profile hands
        paths and the task runs as another uid than ours (a root manager's)."""
        if sys.platform != "linux":
            return ()
        if not isolation.hand_paths or isolation.user is None or os.geteuid() != 0:
            return ()
        from ._isolation.handed import handed_paths

        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None
        return handed_paths(task, cwd, isolation.read_write_paths)

    def launch(
        self,
        task: Task,
        payload: bytes,
        sandbox: Sandbox,
        cpu_time_seconds: float | None,
        siblings: Iterable[Job],
    ) -> Job:
        """Start the worker of ``task``; it waits for the go frame when the job has one."""
        isolation = self._isolation_for(task)
        slot = self._free_slot(siblings)
        ids = _task_ids(isolation, slot)
        hook = getattr(task, "_launch_hook", None)
        if hook is not None:  # before any process exists: what it prepares is there for the task
            # Where the profile hands paths (default), the task acts on them as the manager
            # does (idmapped): a folder given to its uid on disk would be a stranger's there.
            hook(None if isolation.hand_paths else ids)
        options = self.options
        if sys.platform != "win32" and self.process_rlimit and ids and ids[0] != os.getuid():
            # One over the limit: a burst stops there, and the poll that then sees the tree
            # over the limit gives the verdict (a fork the rlimit refuses leaves no record).
            options = dataclasses.replace(options, process_rlimit=self.process_rlimit + 1)
        # The control pipe exists only when the worker must wait for us: to receive the pickled
        # task (spawn/forkserver), or until a parent-side attach has placed it (handshake).
        handshake = bool(payload) or sandbox.parent_attach
        result_r, child_result = transport.result_pipe(self.max_result_bytes)
        child_control, control_w = transport.control_pipe() if handshake else (None, -1)
        forked = self.start_method == "fork"
        foreign: tuple[int, ...] = ()
        if forked:
            foreign = tuple(fd for other in siblings for fd in other.parent_fds())
            foreign += tuple(fd for fd in (result_r, control_w) if fd >= 0)
        spec = WorkerSpec(
            control=child_control,
            result=child_result,
            task=task if forked else None,
            enter_files=sandbox.enter_files(),
            options=options,
            cpu_time_seconds=cpu_time_seconds,
            foreign_fds=foreign,
            manager_pid=self._manager_pid,
            close_inherited_fds=transport.EXIT_BY_PIDFD,
            isolation=isolation,
            slot=slot,
            environment=None if self._zygote else self.environment,
        )
        process: Any
        if sys.platform == "linux" and self._zygote:
            request = Request(
                enter_files=spec.enter_files,
                options=options,
                cpu_time_seconds=cpu_time_seconds,
                modules=_modules_of(task),
                needs_main=b"__main__" in payload,
                fork_before_go=not sandbox.parent_attach,
                isolation=isolation if isolation.enabled else None,
                slot=spec.slot,
                handed=self._handed(task, isolation),
                shm_bytes=self._shm_bytes,
            )
            assert child_control is not None  # a zygote's task always comes in the go frame
            birthplace = sandbox.birthplace or ()
            self._birthplaces.add(birthplace)
            process = ZygoteChild(
                self.environment,
                request,
                child_result.fileno(),
                child_control.fileno(),
                birthplace,
            )
        elif sys.platform != "win32" and self._bare_fork:
            process = ForkedProcess(_worker.main, spec)
        else:
            process = self._context.Process(target=_worker.main, args=(spec,))  # type: ignore[union-attr]
        job = Job(task, sandbox, process)
        job.process_rlimit = options.process_rlimit is not None
        self._slots[id(job)] = spec.slot
        job.reader = protocol.ResultReader(self.max_result_bytes)
        try:
            process.start()
        except BaseException:
            # A Ctrl-C held back across fork() is raised here, once the child exists: it must
            # not run on unwatched (it would write its output after the batch exited 130).
            _kill_started(process)
            for fd in (result_r, control_w):
                if fd >= 0:
                    transport.close(fd)
            raise
        finally:
            # The parent must not hold the child's ends, or EOF would never come.
            child_result.close()
            if child_control is not None:
                child_control.close()
        job.start_time = time.time()  # the task's process exists (a zygote's start is not its)
        job.result_fd, job.control_fd = result_r, control_w
        if sys.platform == "linux" and self._zygote:
            job.exit_fd = os.dup(process.pidfd)  # pidfd_open(pid) could hit a reused pid
            if process.kept_uid:
                job.isolation = f"{isolation.name} (kept the manager's uid: {KEPT_UID_WHY})"
        else:
            job.exit_fd = transport.exit_handle(process)
        if handshake:
            job.go_frame = memoryview(protocol.LENGTH.pack(len(payload)) + payload)
        log.debug("launched %r as pid %s (%s)", task, process.pid, self.start_method)
        return job
