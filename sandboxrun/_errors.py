"""Exceptions that sandboxrun puts into ``TaskResult.exception`` or raises at the call site."""

from __future__ import annotations


class SandboxrunError(Exception):
    """Base class of every error sandboxrun itself raises or reports."""


class BackendUnavailable(SandboxrunError):
    """The requested enforcement backend cannot work on this machine (the message says why)."""


class WorkerDied(SandboxrunError):
    """The task's process ended without delivering a result (crash, signal, ``os._exit``)."""

    def __init__(self, exit_code: int, detail: str = "") -> None:
        self.exit_code = exit_code
        if exit_code < 0:
            import signal

            try:
                name = signal.Signals(-exit_code).name
            except ValueError:
                name = f"signal {-exit_code}"
            what = f"was killed by {name}"
        else:
            what = f"exited with code {exit_code}"
        message = f"the task's process {what} without delivering a result"
        super().__init__(f"{message}: {detail}" if detail else message)


class RemoteError(SandboxrunError):
    """An exception or result that could not cross the process boundary.

    Carries what could be recovered in the worker: the original type name, its message and the
    formatted traceback text.
    """

    def __init__(self, message: str, type_name: str, text: str, traceback_text: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.text = text
        self.traceback_text = traceback_text

    def __reduce__(  # keep all fields when the result itself is pickled
        self,
    ) -> tuple[type[RemoteError], tuple[str, str, str, str]]:
        return (type(self), (self.args[0], self.type_name, self.text, self.traceback_text))


class ExceptionNotPicklable(RemoteError):
    """The task raised an exception that cannot be pickled or unpickled."""


class ResultNotPicklable(RemoteError):
    """The task returned a value that cannot be pickled or unpickled."""


class ResultTransferError(SandboxrunError):
    """The result frame arrived incomplete (the worker was killed while writing it)."""


class CpuTimeLimitExceeded(TimeoutError, SandboxrunError):
    """The task used more CPU time than ``cpu_time_limit_seconds`` (RLIMIT_CPU)."""


class ProcessLimitExceeded(SandboxrunError):
    """The task tried to run more processes than ``max_processes``."""


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of a task's exception: the traceback text from the worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
