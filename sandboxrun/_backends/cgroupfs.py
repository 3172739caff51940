"""Small, verbatim access to cgroupfs files, shared by the cgroup v1 and v2 backends."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_MOUNTS = Path("/proc/self/mountinfo")
RUNNER_PREFIX = "sandboxrun-"


def own_cgroups() -> dict[str, str]:
    """``/proc/self/cgroup`` as {hierarchy key: path}; key ``""`` is cgroup v2, else the v1
    controller list such as ``"memory"`` or ``"cpu,cpuacct"``."""
    result: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in PROC_SELF_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            result[controllers] = path
    return result


def mounts() -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, super options) of every cgroup/cgroup2 mount, from mountinfo."""
    found: list[tuple[str, Path, set[str]]] = []
    with contextlib.suppress(OSError):
        for line in CGROUP_MOUNTS.read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                point = Path(fields[4].replace("\\040", " "))
                found.append((tail[0], point, set(tail[2].split(","))))
    return found


def _read_bytes(path: Path) -> bytes:
    # os.open/os.read rather than Path.read_text (no TextIOWrapper, no codec lookup): several
    # times cheaper, and the manager reads a handful of these files for every task.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return b"".join(chunks)


def read(path: Path) -> str:
    return _read_bytes(path).decode().strip()


def read_int(path: Path) -> int | None:
    try:
        return int(read(path))
    except (OSError, ValueError):
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file such as ``memory.events`` or ``memory.oom_control``."""
    values: dict[str, int] = {}
    try:
        text = _read_bytes(path).decode()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def write(path: Path, value: str | int) -> None:
    # One write() call per value: cgroupfs parses each write on its own.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in _read_bytes(path / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def remove(path: Path, attempts: int = 200) -> None:
    """rmdir, retrying while the kernel still counts dying processes (EBUSY right after a kill)."""
    for attempt in range(attempts):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == attempts - 1:
                raise
            time.sleep(0.001 if attempt < 50 else 0.01)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and every cgroup below it, deepest first."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_tree(child)
    remove(path)


def stale_runner_dirs(parent: Path) -> list[Path]:
    """``sandboxrun-<pid>-*`` cgroups left by runners that died (their pid is gone)."""
    stale = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not (entry.is_dir() and entry.name.startswith(RUNNER_PREFIX)):
                continue
            owner = entry.name[len(RUNNER_PREFIX) :].split("-", 1)[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                stale.append(entry)
    return stale


def runner_dir_name() -> str:
    return f"{RUNNER_PREFIX}{os.getpid()}-{os.urandom(3).hex()}"


def _walk(path: Path) -> list[Path]:
    found = [path]
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            if child.is_dir():
                found += _walk(child)
    return found


def reap_stale(parent: Path) -> None:
    """Remove the cgroups of runners that died (SIGKILLed managers), ending what still runs there.

    Their tasks were started by sandboxrun and lost their watcher: nothing would ever enforce
    their wall-clock limit again.
    """
    for stale in stale_runner_dirs(parent):
        for _ in range(100):
            dirs = _walk(stale)
            for directory in dirs:
                if (directory / "freezer.state").exists():  # a frozen process ignores SIGKILL
                    with contextlib.suppress(OSError):
                        write(directory / "freezer.state", "THAWED")
            victims = [pid for directory in dirs for pid in pids(directory)]
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            remove_tree(stale)
