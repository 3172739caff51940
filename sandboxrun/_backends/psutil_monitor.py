"""The portable backend: a psutil monitor, polled from the manager's event loop.

Used on macOS and Windows, and on Linux without cgroup rights (or with ``backend="psutil"``).
Memory is the summed RSS of the task's process tree, sampled every ``poll_interval_seconds``,
and so is its CPU time (``cpu_time_seconds()`` is the last sample: a process that ended between
two samples counts with what it had used at the last one);
nothing here is enforced by the kernel, so a fast allocator can overshoot the limit by its
allocation rate times the interval. The tree kill stops every process first, then kills them,
so a fork bomb cannot outrun it.
"""

from __future__ import annotations

import contextlib
import logging

import psutil

from .._limits import Limits
from .._reasons import KillReason
from .base import Backend, Sandbox, Usage, WorkerOptions

_KILL_ROUNDS = 20
log = logging.getLogger("sandboxrun.psutil")


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class PsutilSandbox(Sandbox):
    def __init__(self, limits: Limits, interval: float) -> None:
        self.limits = limits
        self.poll_interval_seconds = interval
        self.root: psutil.Process | None = None
        self.known: dict[int, psutil.Process] = {}
        self.peak_memory_bytes = 0
        self.cpu_seconds: dict[int, float] = {}

    def attach(self, pid: int) -> None:  # bookkeeping only: nothing to wait for
        self.root = psutil.Process(pid)
        self.known[pid] = self.root

    def _sample(self) -> tuple[int, int]:
        """(summed RSS, summed tasks): max_processes counts tasks -- processes and threads --
        as pids.max does on the cgroup backends, so a verdict does not depend on the backend."""
        processes = _tree(self.root) if self.root is not None else []
        rss = tasks = 0
        for process in processes:
            self.known.setdefault(process.pid, process)
            with contextlib.suppress(psutil.Error):
                rss += process.memory_info().rss
                tasks += process.num_threads()
                times = process.cpu_times()
                self.cpu_seconds[process.pid] = times.user + times.system
        self.peak_memory_bytes = max(self.peak_memory_bytes, rss)
        return rss, tasks

    def poll(self) -> KillReason | None:
        rss, count = self._sample()  # count: tasks (threads included)
        if self.limits.memory_bytes is not None and rss > self.limits.memory_bytes:
            return KillReason.MEMORY
        if self.limits.max_processes is not None and count > self.limits.max_processes:
            return KillReason.PROCESSES
        # Where there is no RLIMIT_CPU (Windows) this is the CPU-time limit; elsewhere the
        # worker's RLIMIT_CPU usually fires first and this is the tree-wide backstop.
        cpu = self.limits.cpu_time_seconds
        if cpu is not None and sum(self.cpu_seconds.values()) > cpu:
            return KillReason.CPU_TIME
        return None

    def cpu_time_seconds(self) -> float | None:
        return sum(self.cpu_seconds.values())

    def _alive(self) -> list[psutil.Process]:
        found = dict(self.known)
        for process in _tree(self.root) if self.root is not None else []:
            found.setdefault(process.pid, process)
        # is_running() compares the creation time, so a recycled pid is never signalled.
        return [process for process in found.values() if process.is_running()]

    def kill(self) -> None:
        # Stop first (a stopped process cannot fork), then look again for children made
        # meanwhile; kill only once a round finds nothing new.
        for _ in range(_KILL_ROUNDS):
            alive = self._alive()
            new = [process for process in alive if process.pid not in self.known]
            for process in alive:
                self.known.setdefault(process.pid, process)
                with contextlib.suppress(psutil.Error):
                    process.suspend()  # SIGSTOP; NtSuspendProcess on Windows
            if not new and alive:
                break
            if not alive:
                return
        victims = self._alive()
        log.debug("SIGKILL %s (tree of %s)", [p.pid for p in victims], self.root)
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.kill()
        # No wait here: this runs on the event loop, and the grandchildren are not our children
        # (waiting on them only polls). Their parent or init reaps them; collect() looks again.

    def collect(self) -> Usage:
        self.kill()
        cpu = sum(self.cpu_seconds.values()) if self.cpu_seconds else None
        return Usage(peak_memory_bytes=self.peak_memory_bytes, cpu_time_seconds=cpu)

    def remove(self) -> None:
        self.known.clear()
        self.root = None


class PsutilBackend(Backend):
    """No ``cpu_quota`` here (the manager refuses it at construction): without CFS bandwidth
    control the only lever is a SIGSTOP/SIGCONT duty cycle of the polled tree, which a task sees,
    can undo (SIGCONT to itself from a forked helper) and which misses every process forked
    between two polls."""

    name = "psutil"
    enforceable = frozenset()
    worker_options = WorkerOptions(subreaper=True, kill_descendants_on_exit=True)

    def __init__(self, poll_interval_seconds: float = 0.05) -> None:
        self.poll_interval_seconds = poll_interval_seconds

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def details(self) -> dict[str, object]:
        return {"poll_interval_seconds": self.poll_interval_seconds, "psutil": psutil.__version__}

    def sandbox(self, limits: Limits) -> Sandbox:
        return PsutilSandbox(limits, self.poll_interval_seconds)
