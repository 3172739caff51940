"""The tree-wide CPU-time limit, checked from the event loop without busy polling.

The kernel keeps the task's CPU time (``cpuacct.usage`` on cgroup v1, ``cpu.stat usage_usec``
on v2; the psutil backend sums the polled tree), but nothing wakes the manager when it passes
a value. So the scheduler reads it at a *CPU deadline*: the soonest moment the budget could be
spent, which is the budget left divided by the most CPUs the task can use at once (its quota,
else every CPU of the machine -- a task may widen its own affinity, so the manager's is no
bound). The task cannot have spent its budget before that moment; at it the counter is read
and the next deadline computed from what is left, until nothing is::

    arm      deadline = now + budget / width
    check    used = sandbox.cpu_time_seconds()
               None           -> stop checking: RLIMIT_CPU, per process, is all there is
               used >= budget -> kill the tree (KillReason.CPU_TIME)
               else           -> deadline = now + max((budget - used) / width, MIN_CHECK_SECONDS)

A task that mostly waits costs one counter read per (budget left / width) seconds. The floor
bounds the overshoot at width * MIN_CHECK_SECONDS of CPU plus the kill time, and keeps a task
that stops just short of its budget from being read more than 1 / MIN_CHECK_SECONDS times a
second. The worker's RLIMIT_CPU stays as the kernel's own per-process floor under all this.
"""

from __future__ import annotations

import logging
import os

from ._backends.base import Sandbox
from ._limits import Limits

log = logging.getLogger("sandboxrun.scheduler")

MIN_CHECK_SECONDS = 0.01


class CpuBudget:
    """One manager's CPU-time budget per task, and when to look at a task's counter next."""

    def __init__(self, limits: Limits, cpus: int | None = None) -> None:
        self.budget = limits.cpu_time_seconds
        machine = float(cpus or os.cpu_count() or 1)
        quota = limits.cpu_quota
        self.width = machine if quota is None else min(machine, quota)
        self._unmeasurable_logged = False

    def first_deadline(self, now: float) -> float | None:
        """When a task whose code starts ``now`` must be checked first (None: no limit)."""
        return None if self.budget is None else now + self.budget / self.width

    def check(self, sandbox: Sandbox, now: float) -> tuple[bool, float | None]:
        """(spent, the next deadline or None). Spent: the caller kills the task."""
        if self.budget is None:
            return False, None
        used = sandbox.cpu_time_seconds()
        if used is None:
            if not self._unmeasurable_logged:
                self._unmeasurable_logged = True
                log.warning(
                    "this backend cannot read a task's CPU time while it runs: "
                    "cpu_time_limit_seconds=%s holds per process only (RLIMIT_CPU), a task "
                    "that forks can use more in all",
                    self.budget,
                )
            return False, None
        left = self.budget - used
        if left <= 0:
            log.debug("CPU time %.3fs of %ss spent", used, self.budget)
            return True, None
        return False, now + max(left / self.width, MIN_CHECK_SECONDS)
