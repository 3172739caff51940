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
        self.detail = detail
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

    def __reduce__(self) -> tuple[type[WorkerDied], tuple[int, str]]:
        # args holds the message, not the constructor's arguments: without this a pickled
        # WorkerDied (e.g. in a TaskResult sent on) failed to unpickle
        return (type(self), (self.exit_code, self.detail))


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
    """The task used more CPU time than ``cpu_time_limit_seconds`` (its whole process tree, or
    one process under RLIMIT_CPU)."""


class ProcessLimitExceeded(SandboxrunError):
    """The task tried to run more processes than ``max_processes``."""


class TaskCancelled(SandboxrunError):
    """The task was cancelled while it ran (an asyncio cancellation, ``SandboxExecutor.kill``):
    its process tree was killed."""


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of a task's exception: the traceback text from the worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class ResultDecodeError(SandboxrunError):
    """The manager could not decode the body of a task's result frame (garbage, truncated,
    refused by the result-type rules). Raised only by ``sandboxrun._result_types``."""


class ResultTypeRefused(ResultDecodeError):
    """The task's result or exception needs a type the manager does not accept from a worker.

    ``type_name`` is ``module.qualname`` of the refused global. A worker is untrusted: letting
    its pickle name any callable would let it run code in the manager.
    """

    def __init__(self, type_name: str, reason: str = "", allowable: bool = True) -> None:
        self.type_name = type_name
        self.reason = reason
        self.allowable = allowable
        why = f" ({reason})" if reason else ""
        short = type_name.rpartition(".")[2] or type_name
        if allowable:
            allow = (
                f"allow the class with ProcessManager(..., allowed_result_types=[{short}, ...]),"
                " or pass trusted_results=True if you trust every task"
            )
        else:
            allow = "only trusted_results=True lets it through, for tasks you trust"
        super().__init__(
            f"the task's result refers to {type_name}, which the manager does not accept from"
            f" a worker{why}; {allow} (full pickle: a task can then run code in the manager)"
        )

    def __reduce__(self) -> tuple[type[ResultTypeRefused], tuple[str, str, bool]]:
        return (type(self), (self.type_name, self.reason, self.allowable))  # keep every field


class ProtocolError(SandboxrunError):
    """A worker sent a result frame that breaks the wire format (the message says which field)."""


class ResultTooLarge(SandboxrunError):
    """A worker announced a result larger than ``max_result_bytes``; nothing was read."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the task's result is {size} bytes, more than max_result_bytes={limit}; it was"
            " not read (raise the limit with ProcessManager(..., max_result_bytes=N) if such"
            " results are expected)"
        )

    def __reduce__(self) -> tuple[type[ResultTooLarge], tuple[int, int]]:
        return (type(self), (self.size, self.limit))
