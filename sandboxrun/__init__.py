"""sandboxrun: run untrusted work in fresh processes under kernel-enforced limits.

Drop-in for the Glasswall process manager: change the import, keep the code::

    from sandboxrun import ProcessManager, Task
"""

from ._async import AsyncSandbox, run_async
from ._backends import NAMES as BACKEND_NAMES
from ._backends import detect
from ._command import CommandFailed, CommandResult, CommandTask
from ._errors import (
    BackendUnavailable,
    CpuTimeLimitExceeded,
    ExceptionNotPicklable,
    ProcessLimitExceeded,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    ResultDecodeError,
    ResultNotPicklable,
    ResultTooLarge,
    ResultTransferError,
    ResultTypeRefused,
    SandboxrunError,
    TaskCancelled,
    WorkerDied,
)
from ._executor import ManagerOptions, SandboxExecutor, SandboxFuture, task_result
from ._limits import parse_duration, parse_size
from ._manager import ProcessManager
from ._task import Task, TaskResult

GlasswallProcessManager = ProcessManager  # the name Glasswall users already import

__all__ = [
    "BACKEND_NAMES",
    "AsyncSandbox",
    "BackendUnavailable",
    "CommandFailed",
    "CommandResult",
    "CommandTask",
    "CpuTimeLimitExceeded",
    "ExceptionNotPicklable",
    "GlasswallProcessManager",
    "ManagerOptions",
    "ProcessLimitExceeded",
    "ProcessManager",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "ResultDecodeError",
    "ResultNotPicklable",
    "ResultTooLarge",
    "ResultTransferError",
    "ResultTypeRefused",
    "SandboxExecutor",
    "SandboxFuture",
    "SandboxrunError",
    "Task",
    "TaskCancelled",
    "TaskResult",
    "WorkerDied",
    "detect",
    "parse_duration",
    "parse_size",
    "run_async",
    "task_result",
]
__version__ = "0.1.0"
