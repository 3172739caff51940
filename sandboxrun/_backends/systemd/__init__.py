"""The systemd backend: a delegated scope from systemd, then cgroup v2 (``backend.py``).

``bus.py`` talks to the manager, ``runner_scope.py`` is this process's own scope,
``task_scope.py`` one scope per task.
"""

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

from .backend import DEFAULT_SLICE, INSTALL_HINT, MODE_ENV, MODES, SLICE_ENV, SystemdBackend
from .task_scope import RUNTIME_GRACE_SECONDS, SystemdScopeSandbox, task_properties

__all__ = [
    "DEFAULT_SLICE",
    "INSTALL_HINT",
    "MODES",
    "MODE_ENV",
    "RUNTIME_GRACE_SECONDS",
    "SLICE_ENV",
    "SystemdBackend",
    "SystemdScopeSandbox",
    "task_properties",
]
