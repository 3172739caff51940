"""A task module that starts a thread when imported: the zygote that imports it has two threads,
so it cannot make a PID namespace (unshare(CLONE_NEWPID) needs a single-threaded caller)."""

from __future__ import annotations

import os
import threading
import time

from .tasks import fork_grandchild_and_exit

_started = threading.Event()
threading.Thread(target=lambda: (_started.set(), time.sleep(3600)), daemon=True).start()
_started.wait(5)


def pid_and_orphan(pid_file: str) -> tuple[int, int]:
    """Our pid as we see it, and our host pid after leaving an orphaned setsid grandchild."""
    return os.getpid(), fork_grandchild_and_exit(pid_file)
