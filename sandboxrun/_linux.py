"""The few Linux process controls the worker and the command runner need (no-ops elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Loaded once in the manager, inherited by every forked worker (loading libc per task would cost
# milliseconds).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def prctl(option: int, value: int) -> None:
    if _LIBC is not None:
        with contextlib.suppress(OSError, AttributeError):
            _LIBC.prctl(option, value, 0, 0, 0)


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (so nothing runs on unwatched)."""
    if sys.platform != "win32":
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphaned descendants get re-parented to this process instead of init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
