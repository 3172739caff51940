"""Why the manager killed a task: one vocabulary for the backends, scheduler and outcome.

A ``str`` enum, so a backend that still returns the bare string ``"memory"`` compares equal.
"""

from __future__ import annotations

import enum


class KillReason(str, enum.Enum):
    MEMORY = "memory"  # over the memory limit (polled, or a cgroup v1 OOM event)
    PROCESSES = "processes"  # over max_processes (polled)
    CPU_TIME = "cpu_time"  # over cpu_time_limit_seconds (polled where there is no RLIMIT_CPU)
    TIMEOUT = "timeout"  # wall-clock deadline passed
    ATTACH = "attach"  # the sandbox could not take the worker in; no task code ran
    ABORT = "abort"  # the with-body raised: every running task is killed
    CANCELLED = "cancelled"  # its caller cancelled it while it ran (SandboxExecutor, asyncio)

    def __str__(self) -> str:
        return self.value
