"""The one interface every enforcement backend implements.

A backend is chosen once per manager. For every task it makes a ``Sandbox``; the manager drives
each sandbox through the same life cycle::

    sandbox = backend.sandbox(limits)   # limits exist before the task does
    sandbox.attach(pid)                 # the worker is inside; only then may it run task code
    sandbox.poll()                      # polled backends only, every poll_interval_seconds
    sandbox.cpu_time_seconds()          # under a CPU-time limit: the tree's CPU so far
    sandbox.kill()                      # timeout / polled limit / abort: everything inside, at once
    usage = sandbox.collect()           # the task's process has ended: end leftovers, read counters
    sandbox.remove()                    # always, also after errors
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from .._limits import Limits
from .._reasons import KillReason


@dataclasses.dataclass
class Usage:
    """What the enforcement mechanism measured for one task."""

    peak_memory_bytes: int | None = None
    oom_killed: bool = False  # the kernel's OOM killer (or the polled monitor) ended a process
    # The limit was reached at least once (allocation failed or reclaim was forced); read only
    # where the backend's kernel_enforced has "memory": a MemoryError under a limit that was
    # never reached is the task's own, not out_of_memory.
    memory_limit_hit: bool = False
    process_limit_hit: bool = False  # a fork was refused by pids.max at least once
    cpu_time_seconds: float | None = None  # the whole tree's, where a counter keeps it
    # CFS bandwidth control (a CPU quota): periods in which the task was throttled, and for how
    # long in all (cpu.stat nr_throttled, throttled_usec on v2 / throttled_time on v1).
    cpu_throttled_periods: int | None = None
    cpu_throttled_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What the worker must do for this backend before and after the task code."""

    # Linux: make the worker a child subreaper, so orphaned grandchildren stay in its tree
    # where the kill's process-tree snapshot (and a tree-walking backend) can still find them,
    # even when they left the task's cgroup. On for every backend.
    subreaper: bool = True
    # After the function returns: SIGKILL every descendant left (the polled backend has no
    # container that outlives the worker).
    kill_descendants_on_exit: bool = False
    # RLIMIT_NPROC for the task, on top of a polled process limit (no pids.max): given only to a
    # task that runs as a uid of its own, since the kernel counts every process and thread of
    # the uid (with the manager's uid, the manager's and its other tasks' would count too).
    process_rlimit: int | None = None


class Sandbox(abc.ABC):
    """One task's enforcement context."""

    #: ``None``: nothing to poll (the kernel enforces). Else seconds between ``poll()`` calls.
    poll_interval_seconds: float | None = None
    #: A file descriptor the kernel makes readable when something happens to the sandbox (e.g. a
    #: cgroup v1 OOM eventfd). The manager selects on it and then calls ``on_event()``.
    event_fd: int | None = None

    #: True when ``attach`` really places the process (so the worker must wait for the go
    #: frame); False when the worker enters by itself through ``enter_files``.
    parent_attach: bool = False

    #: ``cgroup.procs`` files the launcher's zygote lives in, so that the task is born inside
    #: its cgroups (no migration per task: see ``cgroup_v1_slot``); None: it enters them.
    birthplace: tuple[str, ...] | None = None

    def enter_files(self) -> tuple[str, ...]:
        """``cgroup.procs`` files the worker writes ``0`` into, first thing, before task code.

        Entering from the inside costs the manager nothing and needs no round trip.
        """
        return ()

    def attach(self, pid: int) -> None:  # noqa: B027 - optional hook
        """Parent side, right after the start: record or place process ``pid``."""

    def poll(self) -> KillReason | None:
        """Polled backends: sample; ``KillReason.MEMORY`` or ``KillReason.PROCESSES`` when over
        that limit (a ``str`` enum: the bare strings ``"memory"``/``"processes"`` still work)."""
        return None

    def cpu_time_seconds(self) -> float | None:
        """CPU time used so far by every process of the task (user + system), for the
        scheduler's CPU-time check; ``None``: not measurable here (then only the worker's
        RLIMIT_CPU, per process, applies). Called while the task runs: must be cheap."""
        return None

    def on_event(self) -> KillReason | None:
        """``event_fd`` turned readable: return ``KillReason.MEMORY`` to have the whole task
        killed."""
        return None

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process inside, including ones that fork while being killed."""

    @abc.abstractmethod
    def collect(self) -> Usage:
        """After the worker ended: kill what is left inside and read the final counters."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Release everything this sandbox created. Must be safe to call more than once."""


class Backend(abc.ABC):
    """An enforcement mechanism, set up once per manager."""

    name: ClassVar[str]
    #: Which limits and measurements the kernel can enforce or keep with this mechanism, at best.
    enforceable: ClassVar[frozenset[str]] = frozenset()
    worker_options: ClassVar[WorkerOptions] = WorkerOptions()

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when this backend can work here, else a sentence saying why it cannot."""

    @property
    def kernel_enforced(self) -> frozenset[str]:
        """What the kernel enforces or keeps here (the rest is polled). An instance may know less
        than ``enforceable`` from what it probed (e.g. no ``memory.peak`` before 5.19)."""
        return self.enforceable

    def details(self) -> dict[str, object]:
        """Facts for the detection report (paths, versions, features found)."""
        return {}

    def open(self) -> None:  # noqa: B027 - optional hook
        """Set up what all tasks share (e.g. the runner's cgroup). Called once, lazily."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Undo ``open``. Called once; must not raise for leftovers already gone."""

    @abc.abstractmethod
    def sandbox(self, limits: Limits) -> Sandbox:
        """A fresh sandbox for one task, with the limits in force before the task starts."""

    def slot_sandbox(self, limits: Limits) -> Sandbox:
        """For a launcher whose tasks can be born in place (the zygote): a sandbox that may be
        a reused slot with a ``birthplace``. By default the same as ``sandbox``."""
        return self.sandbox(limits)
