"""Starting one worker: its pipes, its exit fd, the launcher, and the ``WorkerSpec`` it gets.

The launcher only starts the process and hands back a ``Job`` with its fds open; attaching it
to the sandbox, arming its clock and writing the go frame are the scheduler's (so this module
never needs the scheduler, and the outcome never needs either)::

    Launcher.launch(task, payload, sandbox, cpu_time_seconds, siblings)
        result pipe  (worker writes, we read; bigger pipe = fewer wake-ups)
        control pipe (only with a handshake: a task payload or a parent-side attach)
        process.start()  -- ForkedProcess (fork + pidfd) or multiprocessing's Process
        exit fd      (pidfd, else a dup of the multiprocessing sentinel)
      -> Job(result_fd, control_fd, exit_fd, go_frame ready to write or None)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any, Literal

from . import _protocol as protocol
from . import _worker
from ._backends.base import Sandbox, WorkerOptions
from ._job import Job, Process
from ._task import Task
from ._worker import WorkerSpec

StartMethod = Literal["fork", "forkserver", "spawn"]

log = logging.getLogger("sandboxrun.launch")

_PIPE_SIZE = 1 << 20


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return False
    return True


HAVE_PIDFD = _pidfd_works()


def _set_pipe_size(fd: int) -> None:
    # A bigger pipe means fewer wake-ups per large result (Linux only; harmless elsewhere).
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)


def _exit_fd(process: Process, sentinel: Callable[[], int]) -> int:
    # A pidfd turns readable when the process ends, whoever holds its pipes; the
    # multiprocessing sentinel (a pipe) would wait for grandchildren that inherited it.
    if HAVE_PIDFD and process.pid is not None:
        with contextlib.suppress(OSError):
            return os.pidfd_open(process.pid)
    return os.dup(sentinel())  # no pidfd (macOS): multiprocessing's sentinel pipe


class ForkedProcess:
    """A bare ``os.fork`` with the slice of ``multiprocessing.Process`` the scheduler uses.

    Under the fork start method, multiprocessing's Process costs about twice a bare fork per
    task (a sentinel pipe, finalizers, a poll of every other child on each start). The manager
    forks a worker per task, so this is its hot path; spawn and forkserver still go through
    multiprocessing. Used only where pidfds work (the exit fd needs no sentinel).
    """

    def __init__(self, target: Callable[[WorkerSpec], None], spec: WorkerSpec) -> None:
        self._target: Callable[[WorkerSpec], None] | None = target
        self._spec: WorkerSpec | None = spec
        self.pid: int | None = None
        self.exitcode: int | None = None

    def start(self) -> None:
        # SIGINT is blocked across fork(): os.fork() runs at-fork hooks in the parent (logging's
        # lock release, once logging is imported), and a KeyboardInterrupt raised inside one is
        # printed and *ignored* -- a Ctrl-C landing there was lost and the batch ran on. Blocked,
        # it stays pending and is raised once the mask is restored, after self.pid is known.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pid = os.fork()
            if pid == 0:
                self._child(mask)
            self.pid = pid
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _child(self, mask: set[int | signal.Signals]) -> None:
        """Never returns into the manager's code."""
        code = protocol.EXIT_MANAGER_GONE
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            # What multiprocessing's fork bootstrap does for objects registered with it
            # (e.g. a multiprocessing.Lock the task inherited).
            multiprocessing.util._run_after_forkers()  # type: ignore[attr-defined]
            assert self._target is not None and self._spec is not None
            self._target(self._spec)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    def _reap(self, flags: int) -> None:
        if self.exitcode is not None or self.pid is None:
            return
        pid, status = os.waitpid(self.pid, flags)
        if pid:
            self.exitcode = os.waitstatus_to_exitcode(status)

    def join(self, timeout: float | None = None) -> None:
        if timeout is None:
            self._reap(0)
            return
        deadline = time.monotonic() + timeout
        while self.exitcode is None and time.monotonic() < deadline:
            self._reap(os.WNOHANG)
            if self.exitcode is None:
                time.sleep(0.001)

    def kill(self) -> None:
        if self.pid is not None and self.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        self._target, self._spec = None, None


def _kill_started(process: Any) -> None:
    if getattr(process, "pid", None) is None:
        return
    with contextlib.suppress(OSError, ValueError):
        process.kill()
        process.join()
    log.debug("killed pid %s: its launch was interrupted", process.pid)


class Launcher:
    """Chooses how workers start (once per manager) and starts one per call."""

    def __init__(self, start_method: StartMethod, options: WorkerOptions) -> None:
        self.start_method = start_method
        self.options = options
        self._context = multiprocessing.get_context(start_method)
        self._bare_fork = start_method == "fork" and HAVE_PIDFD
        # A forkserver child's parent is the server, not us: no pid to compare.
        self._manager_pid = None if start_method == "forkserver" else os.getpid()

    def launch(
        self,
        task: Task,
        payload: bytes,
        sandbox: Sandbox,
        cpu_time_seconds: float | None,
        siblings: Iterable[Job],
    ) -> Job:
        """Start the worker of ``task``; it waits for the go frame when the job has one."""
        # The control pipe exists only when the worker must wait for us: to receive the pickled
        # task (spawn/forkserver), or until a parent-side attach has placed it (handshake).
        handshake = bool(payload) or sandbox.parent_attach
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe() if handshake else (-1, -1)
        _set_pipe_size(result_w)
        child_result = Connection(result_w)
        child_control = Connection(control_r) if handshake else None
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
            options=self.options,
            cpu_time_seconds=cpu_time_seconds,
            foreign_fds=foreign,
            manager_pid=self._manager_pid,
        )
        process: Any = (
            ForkedProcess(_worker.main, spec)
            if self._bare_fork
            else self._context.Process(target=_worker.main, args=(spec,))  # type: ignore[attr-defined]
        )
        job = Job(task, sandbox, process)
        job.start_time = time.time()
        try:
            process.start()
        except BaseException:
            # A Ctrl-C held back across fork() is raised here, once the child exists: it must
            # not run on unwatched (it would write its output after the batch exited 130).
            _kill_started(process)
            for fd in (result_r, control_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            # The parent must not hold the child's ends, or EOF would never come.
            child_result.close()
            if child_control is not None:
                child_control.close()
        job.result_fd, job.control_fd = result_r, control_w
        os.set_blocking(result_r, False)
        job.exit_fd = _exit_fd(process, lambda: int(process.sentinel))
        if handshake:
            os.set_blocking(control_w, False)
            job.go_frame = memoryview(protocol.LENGTH.pack(len(payload)) + payload)
        log.debug("launched %r as pid %s (%s)", task, process.pid, self.start_method)
        return job
