"""sandboxrun: run untrusted work in fresh processes under kernel-enforced limits.

Drop-in for the Glasswall process manager: change the import, keep the code::

    from sandboxrun import ProcessManager, Task
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from ._isolation import Isolation
    from ._limits import parse_duration, parse_size
    from ._manager import ProcessManager
    from ._task import Task, TaskResult

    GlasswallProcessManager = ProcessManager  # the name Glasswall users already import

# Imported on first use (PEP 562), not here: the zygote imports ``sandboxrun._worker``, and every
# module the package would import costs each task's fork copy-on-write faults and at-fork hooks
# (logging's, psutil's, the scheduler's): measured +1 ms of CPU per fork on this machine.
_WHERE = {
    "AsyncSandbox": ("._async", None),
    "run_async": ("._async", None),
    "ManagerOptions": ("._executor", None),
    "SandboxExecutor": ("._executor", None),
    "SandboxFuture": ("._executor", None),
    "task_result": ("._executor", None),
    "Isolation": ("._isolation", None),
    "BACKEND_NAMES": ("._backends", "NAMES"),
    "detect": ("._backends", "detect"),
    "CommandFailed": ("._command", None),
    "CommandResult": ("._command", None),
    "CommandTask": ("._command", None),
    "parse_duration": ("._limits", None),
    "parse_size": ("._limits", None),
    "ProcessManager": ("._manager", None),
    "GlasswallProcessManager": ("._manager", "ProcessManager"),
    "Task": ("._task", None),
    "TaskResult": ("._task", None),
}


def __getattr__(name: str) -> Any:
    module, attribute = _WHERE.get(name, ("._errors", None) if name in _ERRORS else (None, None))
    if module is None:
        raise AttributeError(f"module 'sandboxrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)



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
    "Isolation",
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
_ERRORS = frozenset(__all__) - frozenset(_WHERE)
__version__ = "0.1.0"
