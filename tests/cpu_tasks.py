"""Task functions for tests/test_cpu_limits.py. Module level, so they pickle under every start
method (the zygote launcher sends the task pickled)."""

from __future__ import annotations

import os
import time


def spin_cpu(seconds: float) -> float:
    """Spin until this process has used ``seconds`` of CPU; the CPU it used."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


def forking_spinner(children: int, seconds: float) -> int:
    """Fork ``children`` processes that each spin ``seconds`` of CPU, wait for all of them.

    Every process stays under a per-process RLIMIT_CPU of one second or two; only a limit that
    counts the whole tree sees the ``children * seconds`` they use together.
    """
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                spin_cpu(seconds)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return len(pids)


def spin_wall(seconds: float, processes: int = 1, ready_file: str | None = None) -> float:
    """Spin for ``seconds`` of wall-clock time in ``processes`` processes (this one and
    ``processes - 1`` forked ones); the CPU this process used. ``ready_file`` is created once
    all of them spin."""
    pids = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            try:
                _spin_until(time.monotonic() + seconds)
            finally:
                os._exit(0)
        pids.append(pid)
    if ready_file is not None:
        with open(ready_file, "w"):
            pass
    start = time.process_time()
    _spin_until(time.monotonic() + seconds)
    for pid in pids:
        os.waitpid(pid, 0)
    return time.process_time() - start


def _spin_until(deadline: float) -> None:
    while time.monotonic() < deadline:
        pass
