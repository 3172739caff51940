"""Small, verbatim access to cgroupfs files, shared by the cgroup v1, v2 and systemd backends.

Every write and every kill is logged at debug level on ``sandboxrun.cgroup`` (the path and the
value, like isolate's and BenchExec's verbose traces); every error that is swallowed because the
run survives it is a warning there, with what it means.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from .. import _log

log = _log.get("sandboxrun.cgroup")

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_MOUNTS = Path("/proc/self/mountinfo")
PROC = Path("/proc")
RUNNER_PREFIX = "sandboxrun-"

_ESCAPE = re.compile(r"\\([0-7]{3})")


class Mount(NamedTuple):
    """One cgroup or cgroup2 line of mountinfo."""

    fstype: str  # "cgroup" (v1) or "cgroup2"
    point: Path
    options: set[str]  # super options: the v1 controllers bound there, e.g. {"rw", "memory"}


def own_cgroups() -> dict[str, str]:
    """``/proc/self/cgroup`` as {hierarchy key: path}; key ``""`` is cgroup v2, else the v1
    controller list such as ``"memory"`` or ``"cpu,cpuacct"``."""
    result: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in PROC_SELF_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            result[controllers] = path
    return result


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 \011 \012 \134).
    if "\\" not in field:
        return field
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def cgroup_mount_lines() -> list[tuple[str, str, str]]:
    """``(type, mount point, super options)`` of every cgroup/cgroup2 mount in mountinfo
    (fields before `` - ``, then type, source, super options).

    Raw bytes, and only the cgroup lines decoded: each zygote task reads it once, cold
    (_isolation/_cgroupns.py), in a mount namespace of dozens of binds -- a buffered text read,
    a split of every line and a Path per mount were ~0.3 ms of its start."""
    found: list[tuple[str, str, str]] = []
    try:
        data = read_bytes(CGROUP_MOUNTS)
    except OSError:
        return found
    at = data.find(b" - cgroup")  # only those lines are cut out: no object per other line
    while at >= 0:
        start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
        end = len(data) if end < 0 else end
        left, _, right = data[start:end].partition(b" - ")
        fields, tail = left.split(), os.fsdecode(right).split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], _unescape(os.fsdecode(fields[4])), tail[2]))
        at = data.find(b" - cgroup", end)
    return found


def mounts() -> list[Mount]:
    """Every cgroup/cgroup2 mount (``cgroup_mount_lines``, with paths and option sets)."""
    return [Mount(kind, Path(point), set(options.split(",")))
            for kind, point, options in cgroup_mount_lines()]  # fmt: skip


def read_bytes(path: Path | str) -> bytes:
    # os.open/os.read rather than Path.read_text (no TextIOWrapper, no codec lookup): several
    # times cheaper, and the manager reads a handful of these files for every task.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return b"".join(chunks)


class OpenFiles:
    """Counter files of a reused cgroup (a slot) kept open: read with pread(2) from offset 0,
    where a seq_file makes its content afresh, and written with write(2) (cgroupfs parses
    each write on its own, at any offset). An open and a close less per access, every value
    still the kernel's of the moment. Never for ``cgroup.procs`` (see ``pids``)."""

    def __init__(self) -> None:
        self._fds: dict[tuple[Path, int], int] = {}

    def _fd(self, path: Path, flags: int) -> int:
        fd = self._fds.get((path, flags))
        if fd is None:
            fd = self._fds[path, flags] = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
        return fd

    def read(self, path: Path) -> bytes:
        if sys.platform == "win32":  # no pread(2), and no cgroups either
            raise OSError(errno.ENOSYS, f"cannot read {path}: no cgroups on Windows")
        fd = self._fd(path, os.O_RDONLY)
        chunks = [os.pread(fd, 65536, 0)]
        offset = len(chunks[0])
        while chunks[-1]:
            chunks.append(os.pread(fd, 65536, offset))
            offset += len(chunks[-1])
        return b"".join(chunks)

    def write(self, path: Path, value: str | int) -> None:
        log.debug("write %s <- %s", path, value)
        os.write(self._fd(path, os.O_WRONLY), str(value).encode())

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def read(path: Path) -> str:
    return read_bytes(path).decode().strip()


def read_int(path: Path, files: OpenFiles | None = None) -> int | None:
    try:
        return int(files.read(path) if files is not None else read_bytes(path))
    except (OSError, ValueError):
        return None


def read_keyed(path: Path, files: OpenFiles | None = None) -> dict[str, int]:
    """A flat-keyed file such as ``memory.events`` or ``memory.oom_control``."""
    values: dict[str, int] = {}
    try:
        text = (files.read(path) if files is not None else read_bytes(path)).decode()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def write(path: Path, value: str | int) -> None:
    # One write() call per value: cgroupfs parses each write on its own.
    log.debug("write %s <- %s", path, value)  # lazy: no formatting unless debug is on
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def pids(path: Path) -> list[int]:
    # Opened afresh each time, never kept open and re-read: a v1 cgroup.procs fd caches its
    # pid list (cgroup_pidlist_start reuses it, for up to a second) where a new open does not.
    try:
        return [int(line) for line in read_bytes(f"{path}/cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def kill_pids(victims: Iterable[int], where: Path) -> None:
    """SIGKILL each pid (listed in ``where``'s cgroup.procs); the ones already gone are fine."""
    victims = list(victims)
    log.debug("SIGKILL %s in %s", victims, where)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, getattr(signal, "SIGKILL", 9))


def remove(path: Path, attempts: int = 200) -> None:
    """rmdir, retrying while the kernel still counts dying processes (EBUSY right after a kill)."""
    for attempt in range(attempts):
        try:
            os.rmdir(path)
            log.debug("rmdir %s", path)
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or attempt == attempts - 1:
                raise
            time.sleep(0.001 if attempt < 50 else 0.01)


def remove_tree(path: Path, attempts: int = 200) -> None:
    """Remove ``path`` and every cgroup below it, deepest first (a task may have made some)."""
    if not path.is_dir():
        return
    for child in sorted(subdirs(path), reverse=True):
        remove_tree(child, attempts)
    remove(path, attempts)


def tree_pids(path: Path) -> list[int]:
    """Every pid in ``path`` and in every cgroup below it (v1 ``cgroup.procs`` is per directory)."""
    return [pid for directory in walk(path) for pid in pids(directory)]


# ---------------------------------------------------------------- cleanup that has to wait
#
# A cgroup whose rmdir still says EBUSY after the kill (a process stuck in D state, a sub-cgroup
# the kernel still counts) must not cost the batch anything: it goes on this process-wide list,
# is retried later with exponential back-off (Leftovers.retry, called by the backends at
# sandbox(), open() and close()), logged, and reported by ``sandboxrun doctor``.

_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 30.0


class Leftovers:
    """Cgroup directories whose removal failed, each with the time of its next try."""

    def __init__(self) -> None:
        self._due: dict[Path, tuple[float, float]] = {}  # path -> (next try, back-off)

    def defer(self, path: Path, error: OSError) -> None:
        if path not in self._due:
            log.warning(
                "cannot remove %s (%s): the result stands; the removal is retried off the hot "
                "path and `sandboxrun doctor` lists it until then",
                path,
                error,
            )
        self._due[path] = (time.monotonic() + _RETRY_FIRST_SECONDS, _RETRY_FIRST_SECONDS)

    def paths(self) -> list[Path]:
        return list(self._due)

    def retry(self, force: bool = False) -> None:
        """One rmdir attempt per leftover whose back-off is over (every one with ``force``)."""
        now = time.monotonic()
        for path, (due, delay) in list(self._due.items()):
            if not force and now < due:
                continue
            for directory in reversed(walk(path)):  # kill what is still there, deepest first
                kill_pids(pids(directory), directory)
            try:
                remove_tree(path, attempts=1)
            except OSError as error:
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                self._due[path] = (now + delay, delay)
                log.debug("rmdir %s still fails (%s): next try in %.2fs", path, error, delay)
                continue
            log.info("removed the leftover cgroup %s", path)
            del self._due[path]


LEFTOVERS = Leftovers()


def remove_or_defer(path: Path, attempts: int = 200) -> bool:
    """``remove_tree``; on failure the path goes on ``LEFTOVERS`` instead of raising."""
    try:
        remove_tree(path, attempts)
    except OSError as error:
        LEFTOVERS.defer(path, error)
        return False
    return True


def runner_owner(name: str) -> int | None:
    """The pid in a ``sandboxrun-<pid>-<rand>`` name (a runner cgroup or a systemd unit)."""
    if not name.startswith(RUNNER_PREFIX):
        return None
    owner = name[len(RUNNER_PREFIX) :].split("-", 1)[0]
    return int(owner) if owner.isdigit() else None


def is_stale(name: str) -> bool:
    """A ``sandboxrun-<pid>-…`` name whose process is gone (a runner that died)."""
    owner = runner_owner(name)
    return owner is not None and not (PROC / str(owner)).exists()


def stale_runner_dirs(parent: Path) -> list[Path]:
    """``sandboxrun-<pid>-*`` cgroups left by runners that died (their pid is gone)."""
    stale = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if entry.is_dir() and is_stale(entry.name):
                stale.append(entry)
    return stale


def runner_dir_name() -> str:
    return f"{RUNNER_PREFIX}{os.getpid()}-{os.urandom(3).hex()}"


def subdirs(path: Path) -> list[Path]:
    """The cgroups directly below ``path`` ([] if it is gone).

    The manager asks this of every task's cgroups (a task may have made sub-cgroups), and a
    task almost never has any. A cgroupfs directory's link count is 2 plus its subdirectories
    (kernfs keeps it, as ext4 does): exactly 2 means none, for one stat() instead of a listing
    and a stat() of each of the ~35 files a v1 memory cgroup holds. Any other count lists,
    with the entry types the listing gives (no stat per entry).
    """
    try:
        if os.stat(path).st_nlink == 2:
            return []
        with os.scandir(path) as entries:
            return [path / entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def walk(path: Path) -> list[Path]:
    """``path`` and every directory below it, parents before children."""
    found = [path]
    for child in subdirs(path):
        found += walk(child)
    return found


def reap_stale(parent: Path) -> None:
    """Remove the cgroups of runners that died (SIGKILLed managers), ending what still runs there.

    Their tasks were started by sandboxrun and lost their watcher: nothing would ever enforce
    their wall-clock limit again.
    """
    for stale in stale_runner_dirs(parent):
        log.info("reaping %s: its runner (pid %s) is gone", stale, runner_owner(stale.name))
        for _ in range(100):
            dirs = walk(stale)
            for directory in dirs:
                if (directory / "freezer.state").exists():  # a frozen process ignores SIGKILL
                    try:
                        write(directory / "freezer.state", "THAWED")
                    except OSError as error:
                        log.warning("cannot thaw %s (%s): its tasks may survive", directory, error)
            victims = [(pid, directory) for directory in dirs for pid in pids(directory)]
            if not victims:
                break
            for pid, directory in victims:
                with contextlib.suppress(PermissionError):
                    kill_pids([pid], directory)
            time.sleep(0.01)
        try:
            remove_tree(stale)
        except OSError as error:
            log.warning(
                "cannot remove the stale runner cgroup %s (%s): it stays until a later runner "
                "retries",
                stale,
                error,
            )


def v2_cgroup_of(pid: int | str, mount: Path) -> Path | None:
    """The cgroup v2 directory of process ``pid`` (``"self"`` for this one) under ``mount``."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    return None
