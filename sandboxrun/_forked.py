"""The bare ``os.fork`` launcher (POSIX only: imported by ``_launch`` where fork exists)."""

from __future__ import annotations

import multiprocessing.util
import os
import signal
import sys
import time
from collections.abc import Callable

from . import _protocol as protocol
from ._worker import WorkerSpec

assert sys.platform != "win32"  # no fork there (mypy --platform win32 skips this module)


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
