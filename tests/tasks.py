"""Task functions for the tests. Module level, so they pickle under spawn and forkserver."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

MIB = 1024 * 1024
T = TypeVar("T")


def host_pid() -> int | str:
    """This process's pid as the test (outside the task's PID namespace) sees it, or a mark the
    test resolves to it (``read_pid``). /proc numbers processes in the namespace of whoever
    mounted it: under the default profile a task has a /proc of its own, in which its pid is
    its namespace's, and no file there names its host pid (by design). It then hands over its
    namespace pid, its start time (boot-relative clock ticks, the same in every PID namespace)
    and its PID namespace's inode: together they name one process on the host."""
    try:
        pid = int(os.readlink("/proc/self"))
    except (OSError, ValueError):  # no /proc (macOS)
        return os.getpid()
    if pid != os.getpid() or _namespace(pid) == _INIT_PID_NAMESPACE:  # the host's /proc
        return pid
    return _mark(pid)


#: The initial PID namespace's inode, fixed by the kernel (PROC_PID_INIT_INO).
_INIT_PID_NAMESPACE = str(0xEFFFFFFC)


def _mark(pid: int) -> str:
    """The mark ends with a token drawn once per process at its first mark (never in the zygote,
    whose children would share it): two tasks in one process would show the same one, two
    processes that share the rest (a recycled namespace inode, the same clock tick) would not."""
    mark = f"mark:{pid}:{_start_time(pid)}:{_namespace(pid)}"
    if pid == os.getpid():
        global _token
        if _token is None or _token[0] != os.getpid() or _token[1] != mark:
            _token = (os.getpid(), mark, os.urandom(8).hex())
        mark += ":" + _token[2]
    return mark


_token: tuple[int, str, str] | None = None


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime


def host_pid_of_child(pid: int) -> int | str:
    """The /proc pid of our child ``pid`` (a pid of the task's namespace), or a mark."""
    if isinstance(host_pid(), str):  # our own /proc: the test finds the child by its mark
        return _mark(pid)
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as children:
                for child in children.read().split():
                    with open(f"/proc/{child}/status") as status:
                        for line in status:
                            if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                                return int(child)
    except (OSError, ValueError):
        pass
    return pid


#: What ``read_pid`` answers for a marked process that is gone: no such pid exists
#: (pid_max is at most 2**22), and it is no special value for kill(2) as -1 or 0 are.
GONE_PID = 2**31 - 2


def read_pid(path: str | os.PathLike[str] | int) -> int:
    """The host pid in a pid file written by ``write_pid`` (or a value ``host_pid`` returned):
    a number, or a mark resolved by scanning the host's /proc (``GONE_PID`` when that process
    has ended)."""
    text = str(path) if isinstance(path, int) else pathlib.Path(path).read_text().strip()
    return resolve_pid(text)


def resolve_pid(value: int | str) -> int:
    """``host_pid``'s answer as a host pid (``GONE_PID``: that process has ended)."""
    text = str(value)
    if not text.startswith("mark:"):
        return int(text)
    _, nspid, start, namespace = text.split(":")[:4]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(entry)
                same = _start_time(pid) == int(start) and _nspid(pid) == int(nspid)
                if same and _namespace(pid) == namespace:
                    return pid
    return GONE_PID


def _namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid").removeprefix("pid:[").removesuffix("]")


def _nspid(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def write_pid(path: str, pid: int | None = None) -> None:
    """Write a pid file atomically (a temporary file renamed over it): whoever sees the file
    can read the whole pid, never an empty or half-written one. ``pid`` (a child's) and our own
    are written as the test sees them (``host_pid``)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    pathlib.Path(temporary).write_text(str(host_pid() if pid is None else host_pid_of_child(pid)))
    os.replace(temporary, path)


def double(x: Any) -> Any:
    return x * 2


def identity(x: T) -> T:
    return x


def pid_and_value(x: T) -> tuple[int, T]:
    return host_pid(), x


def convert_file(input_file: str, output_file: str) -> None:
    data = pathlib.Path(input_file).read_bytes()
    pathlib.Path(output_file).write_bytes(data.upper())


def file_to_memory(input_file: str) -> bytes:
    return pathlib.Path(input_file).read_bytes().upper()


def sleep_then(seconds: float, value: T | None = None) -> T | None:
    time.sleep(seconds)
    return value


def record_interval(directory: str, seconds: float) -> None:
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    path = pathlib.Path(directory) / f"{os.getpid()}-{start}"
    path.write_text(f"{start} {end}")


def wait_for_file(pid_file: str, release_file: str, seconds: float) -> bool:
    """Write our pid, then wait (at most ``seconds``) until ``release_file`` exists."""
    write_pid(pid_file)
    deadline = time.monotonic() + seconds
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.path.exists(release_file)


def touch_after(path: str, seconds: float) -> None:
    time.sleep(seconds)
    pathlib.Path(path).write_text("ran")


def raise_value_error(message: str) -> NoReturn:
    raise ValueError(message)


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_unpicklable_exception() -> NoReturn:
    raise NeedsTwoArgs("left", "right")


def return_lambda() -> Callable[[], int]:
    return lambda: 1


def exit_hard(code: int) -> NoReturn:
    os._exit(code)


def sys_exit(code: int) -> NoReturn:
    sys.exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def segfault() -> None:
    ctypes.string_at(0)


def ignore_sigterm_and_sleep(pid_file: str, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_pid(pid_file)
    time.sleep(seconds)


def spawn_grandchild(pid_file: str, then_sleep: float = 0.0) -> int:
    """Start `sleep 300` in its own session (process-group kills miss it), then return or hang."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    write_pid(pid_file, child.pid)
    time.sleep(then_sleep)
    return host_pid_of_child(child.pid)


def fork_grandchild_and_exit(pid_file: str) -> int:
    """Double fork: the grandchild is orphaned at once, before any poll could see it."""
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            os.setsid()
            write_pid(pid_file)
            time.sleep(300)
        os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while not pathlib.Path(pid_file).exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    return host_pid()


def big_result(size: int) -> bytes:
    return b"x" * size


def flood_stdout(megabytes: int) -> str:
    chunk = "y" * (MIB - 1) + "\n"
    for _ in range(megabytes):
        sys.stdout.write(chunk)
    sys.stdout.flush()
    return "done"


def allocate(step_mib: int, steps: int, pause: float = 0.0) -> int:
    """Touch memory step by step (bytes objects are written, so really resident)."""
    held = []
    for _ in range(steps):
        held.append(b"z" * (step_mib * MIB))
        if pause:
            time.sleep(pause)
    return len(held)


def touch_and_return(mib: int) -> int:
    data = bytearray(mib * MIB)
    for offset in range(0, len(data), 4096):
        data[offset] = 1
    return len(data)


def fork_bomb(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    forked = 0
    while time.monotonic() < deadline:
        try:
            if os.fork() == 0:
                time.sleep(seconds)
                os._exit(0)
            forked += 1
        except OSError:
            time.sleep(0.001)
    return forked


def burn_cpu(seconds: float) -> str:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return "burned"


def check_threads_safe(n: int) -> int:
    return sum(range(n))


def run_command(argv: list[str]) -> int:
    return subprocess.run(argv, check=False).returncode


def fork_or_fail(count: int) -> int:
    """Start `count` sleepers; a refused fork raises (BlockingIOError), as real tools do."""
    children = [subprocess.Popen(["sleep", "5"]) for _ in range(count)]
    for child in children:
        child.kill()
    return len(children)


def killed_while_sending_result(size: int) -> bytes:
    """Return a big result, and SIGKILL ourselves while the worker is writing it to the pipe."""
    import threading

    # As /proc numbers it (threading.get_native_id() answers in the task's PID namespace).
    main = os.readlink("/proc/thread-self")

    def killer() -> None:
        # /proc/<tid>/syscall names the syscall a thread is blocked in (write: 1 on x86-64),
        # which the main thread only enters to send the result frame.
        status = pathlib.Path(f"/proc/{main}/syscall")
        write = {"x86_64": "1", "aarch64": "64"}[platform.machine()]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if status.read_text().split()[0] == write:
                break
            time.sleep(0.0002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    return b"r" * size


def start_threads(count: int, seconds: float) -> int:
    """Start up to ``count`` threads that sleep ``seconds`` (all alive at once); return how many
    started, or, when the kernel refuses one (pids.max, RLIMIT_NPROC: "can't start new thread"),
    raise a RuntimeError saying how many were running, as a converter would fail there."""
    import threading

    started = 0
    for _ in range(count):
        thread = threading.Thread(target=time.sleep, args=(seconds,), daemon=True)
        try:
            thread.start()
        except RuntimeError as refused:
            raise RuntimeError(f"{started} threads running, then: {refused}") from None
        started += 1
    return started


def nproc_limit() -> tuple[int, int]:
    """This process's RLIMIT_NPROC (soft, hard)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NPROC)
