"""cgroup v1, born in place: one cgroup per worker slot, reused, with the slot's zygote inside.

Moving a process into a v1 cgroup costs about 0.4 ms per hierarchy on this project's machine
(each write to ``cgroup.procs`` takes the cgroup threadgroup lock and waits for an RCU grace
period), so entering five hierarchies per task cost ~2 ms, more than the fork. Here the zygote
(``_zygote``) moves once, when the slot is made; every task it forks is born inside, and the
slot's directories live as long as the backend::

    <runner>/slot-<n>        in every hierarchy but freezer (a frozen slot would freeze its zygote;
                             the tree kill is the PID namespace's: SIGKILL of the task's PID 1)

Each task's counters are made its own when the slot is handed out (``begin``), verbatim kernel
files again:

- ``memory.max_usage_in_bytes`` and ``memory.failcnt`` are reset by writing 0 (the peak restarts
  from the current usage); ``cpuacct.usage`` likewise;
- what is charged to the slot then (the zygote's own allocations since it moved, page cache a
  previous task left) is the *baseline*: the limit written is the task's limit plus it, and the
  peak reported is the maximum minus it -- the zygote never eats into a task's allowance;
- ``oom_kill`` (``memory.oom_control``), ``max`` (``pids.events``) and ``cpu.stat``'s
  throttling counters cannot be reset: deltas;
- ``pids.max`` is the task's ``max_processes`` plus two (the zygote and the task's PID 1 reaper),
  so a task may start exactly as many processes as under the per-task layout;
- the zygote's ``oom_score_adj`` is -1000 and the task's PID 1 raises its own to 1000: under an
  OOM the kernel picks the task, never the zygote.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import os
from pathlib import Path

from .._limits import Limits
from . import cgroupfs
from .base import Usage
from .cgroup_v1 import CgroupV1Sandbox, parent_pid

log = cgroupfs.log

#: The zygote and the task's PID 1, which the per-task layout did not have in its cgroup.
SLOT_OVERHEAD_PROCESSES = 2


class SlotSandbox(CgroupV1Sandbox):
    """A reused slot; ``begin()`` before each task, ``remove()`` hands it back to ``free``."""

    def __init__(
        self, dirs: dict[str, Path], limits: Limits, running: set[str], free: list[SlotSandbox]
    ) -> None:
        self._free = free
        self._limit_written: int | None = None
        self.baseline = 0
        self._pids_base = 0
        self._has_memsw: bool | None = None
        self._throttle_base: dict[str, int] = {}
        self.zygote: int | None = None
        super().__init__(dirs, limits, running, write_limits=False)
        self.kept: cgroupfs.OpenFiles = cgroupfs.OpenFiles()  # for the slot's life
        self.birthplace = self.enter_files()

    def enter_files(self) -> tuple[str, ...]:
        if getattr(self, "birthplace", None) is not None:
            return ()  # the zygote lives there: its tasks are born inside
        return super().enter_files()

    def begin(self, limits: Limits) -> SlotSandbox:
        """Make the slot's counters this task's (see the module docstring)."""
        self.limits = limits
        self._removed = False
        memory = self.dirs["memory"]
        self.kept.write(self.file("memory", "memory.max_usage_in_bytes"), 0)
        self.kept.write(self.file("memory", "memory.failcnt"), 0)
        if "cpuacct" in self.dirs:
            self.kept.write(self.file("cpuacct", "cpuacct.usage"), 0)
        self.baseline = self._read_int("memory", "memory.usage_in_bytes") or 0
        if limits.memory_bytes is not None:
            log.debug("slot %s: baseline %d bytes (the zygote's charges, leftovers): the limit"
                      " is the task's plus it", memory, self.baseline)  # fmt: skip
            self._write_memory_limit(memory, limits.memory_bytes + self.baseline)
        oom = cgroupfs.read_keyed(self.file("memory", "memory.oom_control"), self.kept)
        self._oom_base = oom.get("oom_kill", 0)
        self._throttle_base = self._throttling()
        if "pids" in self.dirs and limits.max_processes is not None:
            pids_max = limits.max_processes + SLOT_OVERHEAD_PROCESSES
            self.kept.write(self.file("pids", "pids.max"), pids_max)
            self._pids_base = self._pids_refused()
        if self.event_fd is None and limits.memory_bytes is not None:
            self.event_fd = self._oom_eventfd(memory)
        elif self.event_fd is not None:
            with contextlib.suppress(BlockingIOError):  # an event of the previous task's
                os.eventfd_read(self.event_fd)
        return self

    def _write_memory_limit(self, memory: Path, limit: int) -> None:
        if limit == self._limit_written:
            return
        memsw = self.file("memory", "memory.memsw.limit_in_bytes")
        if self._has_memsw is None:  # swap accounting does not come and go under a slot
            self._has_memsw = memsw.exists()
        has_memsw = self._has_memsw
        # memory.limit_in_bytes may never exceed memsw: raise memsw first, lower it last (a new
        # cgroup's limits are unlimited: the first write lowers them).
        raising = self._limit_written is not None and limit > self._limit_written
        if has_memsw and raising:
            self.kept.write(memsw, limit)
        self.kept.write(self.file("memory", "memory.limit_in_bytes"), limit)
        if has_memsw and not raising:
            self.kept.write(memsw, limit)
        self._limit_written = limit

    def attach(self, pid: int) -> None:
        super().attach(pid)
        self.zygote = parent_pid(pid)  # the task's PID 1 is the zygote's child: spare it

    def _members(self) -> list[int]:
        return [pid for pid in super()._members() if pid != self.zygote]

    def _pids_refused(self) -> int:
        return cgroupfs.read_keyed(self.file("pids", "pids.events"), self.kept).get("max", 0)

    def collect(self) -> Usage:
        usage = super().collect()  # oom_killed: oom_kill above _oom_base, read in begin()
        if usage.peak_memory_bytes is not None:
            usage.peak_memory_bytes = max(0, usage.peak_memory_bytes - self.baseline)
        if usage.cpu_throttled_periods is not None:  # cpu.stat counts since the slot was made
            usage.cpu_throttled_periods -= self._throttle_base.get("nr_throttled", 0)
        if usage.cpu_throttled_seconds is not None:
            base = self._throttle_base.get("throttled_time", 0) / 1e9
            usage.cpu_throttled_seconds = max(0.0, usage.cpu_throttled_seconds - base)
        return usage

    def _throttling(self) -> dict[str, int]:
        if self.limits.cpu_quota is None or "cpu" not in self.dirs:
            return {}
        return cgroupfs.read_keyed(self.file("cpu", "cpu.stat"), self.kept)

    def _forks_refused(self) -> bool:
        if "pids" not in self.dirs or self.limits.max_processes is None:
            return False
        return self._pids_refused() > self._pids_base

    def remove(self) -> None:
        """Hand the slot back (its directories stay until the backend closes)."""
        if self._removed:
            return
        self._removed = True
        self.running.discard(self.namespace or "")
        self.namespace = self.zygote = None
        # Sub-cgroups the task made (collect() has emptied them): the next task starts clean.
        for path in self.paths:
            for sub in cgroupfs.subdirs(path):
                with contextlib.suppress(OSError):
                    cgroupfs.remove_tree(sub, attempts=50)
        self._free.append(self)

    def destroy(self) -> None:
        """The backend is closing and the slot's zygote has gone: remove the directories."""
        self._close_event_fd()
        self.kept.close()
        for path in self.paths:
            cgroupfs.remove_or_defer(path, attempts=50)
