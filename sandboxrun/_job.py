"""The parent-side record of one launched task: plain data, no behaviour.

It sits at the bottom of the import graph (manager -> scheduler -> launch / outcome -> job) so that
the launcher can hand back a job, the scheduler drive it and the outcome read it, without any of
them importing each other.
"""

from __future__ import annotations

from typing import Protocol

from ._backends.base import Sandbox
from ._protocol import ResultReader
from ._reasons import KillReason
from ._task import Task


class Process(Protocol):
    """The slice of ``multiprocessing.Process`` the scheduler uses (``ForkedProcess`` too)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    def start(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...


class Job:
    """Book-keeping for one launched task.

    ``exit_fd`` (a pidfd, or a dup of the multiprocessing sentinel) keys the job in the scheduler;
    an fd of -1 is closed. ``go_frame`` is what is left to write of the control frame, None once
    written (or when there is no handshake). ``deadline``/``cpu_deadline``/``next_poll`` are None
    until armed.
    """

    __slots__ = (
        "control_fd",
        "cpu_deadline",
        "deadline",
        "end_time",
        "error",
        "exit_fd",
        "go_frame",
        "isolation",
        "kill_reason",
        "next_poll",
        "process",
        "process_rlimit",
        "reader",
        "result_fd",
        "sandbox",
        "start_time",
        "task",
    )

    def __init__(self, task: Task, sandbox: Sandbox, process: Process) -> None:
        self.task = task
        self.sandbox = sandbox
        self.process = process
        self.exit_fd = -1
        self.result_fd = -1
        self.control_fd = -1
        self.go_frame: memoryview | None = None
        self.reader = ResultReader()
        self.start_time = 0.0
        self.end_time = 0.0
        self.deadline: float | None = None
        self.cpu_deadline: float | None = None  # when to read the tree's CPU time next
        self.next_poll: float | None = None
        self.kill_reason: KillReason | None = None
        self.error: BaseException | None = None
        self.isolation = ""  # TaskResult.isolation when it differs from the manager's profile
        self.process_rlimit = False  # the task got RLIMIT_NPROC (psutil, a uid of its own)

    def parent_fds(self) -> tuple[int, ...]:
        """The manager's open fds of this job (a forked sibling must close them)."""
        fds = (self.result_fd, self.control_fd, self.exit_fd, self.sandbox.event_fd)
        return tuple(fd for fd in fds if fd is not None and fd >= 0)
