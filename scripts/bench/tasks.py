"""The task functions every tool runs. Module level, so every start method can reach them by
name; stdlib only and cheap to import, since a task process may import this module first."""

from __future__ import annotations

import os
import resource
import signal
import time

from . import MIB


def trivial(i: int) -> int:
    return i


def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime  # the task's own CPU, to subtract from the parent's


def _vmhwm() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def allocator(log_path: str, step: int, total: int) -> int:
    """Allocate ``step`` bytes at a time, as fast as possible, logging after every step."""
    start = time.monotonic()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"0.000 0 {_vmhwm()}\n".encode())
    chunks = []
    allocated = 0
    while allocated < total:
        chunks.append(b"x" * step)  # bytes * n writes every page: really resident
        allocated += step
        ms = (time.monotonic() - start) * 1000
        os.write(fd, f"{ms:.3f} {allocated} {_vmhwm()}\n".encode())
    os.close(fd)
    return allocated


def toucher(mib: int, hold_seconds: float) -> dict[str, int]:
    """Touch ``mib`` MiB and report this process's own peak RSS (VmHWM), at once or later."""
    before = _vmhwm()
    data = b"x" * (mib * MIB)
    peak = _vmhwm()
    if hold_seconds:
        time.sleep(hold_seconds)
    del data
    return {"vmhwm": peak, "before": before}


def hostile(pid_path: str) -> None:
    """Ignore SIGTERM, start a grandchild in its own session, then hang."""
    entered = time.monotonic()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import subprocess  # after the entry time, as the deadline is measured from it

    subprocess.Popen(["sleep", "300"], start_new_session=True)
    temporary = pid_path + ".tmp"
    with open(temporary, "w") as out:
        out.write(f"{_proc_pid()} {_proc_child()} {entered}\n")
    os.rename(temporary, pid_path)
    while True:
        time.sleep(1)


def _proc_pid() -> int:
    """Our pid as /proc numbers it: the measuring process is outside the task's PID namespace
    (os.getpid() answers inside it)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def _proc_child() -> int:
    """Our one child's pid as /proc numbers it."""
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as children:
            found = children.read().split()
            if found:
                return int(found[0])
    raise RuntimeError("no child")


def big_result(size: int) -> tuple[float, bytes]:
    data = b"x" * size
    return time.monotonic(), data


def cpu_spinner(children: int, seconds: float) -> int:
    """Spin ``seconds`` of CPU in each of ``children`` forked processes (0: in this one)."""
    if children == 0:
        _spin_cpu(seconds)
        return 0
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            _spin_cpu(seconds)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return children


def _spin_cpu(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
