"""Memory figures for sizing ``max_workers``, at ``glasswall.multiprocessing.memory_usage``'s path.

Glasswall's ``get_available_memory_gib()`` is the host's available memory. Inside a container,
a systemd service or any memory-limited cgroup that is wrong: the kernel OOM-kills the runner's
cgroup long before the host runs short. Here the answer is the smallest of

    host available (psutil.virtual_memory().available)
    for each memory cgroup from our own up to the root of its hierarchy:
        v2: min(memory.max, memory.high) - (memory.current - inactive_file)
        v1: memory.limit_in_bytes        - (memory.usage_in_bytes - total_inactive_file)

"Unlimited" (v2 ``max``; v1's page-rounded 2**63-ish value) and missing files are skipped. The
inactive file cache is counted as free, as the kernel reclaims it before it OOM-kills (and as
psutil's host ``available`` does): a runner that just read many files is not out of memory.
Our own cgroup is found from ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` (via
``sandboxrun._backends.cgroupfs``); when its path is not visible under the mount (a container
without its own cgroup namespace mounts only its subtree), the longest visible tail is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from .._backends import cgroupfs

log = logging.getLogger("sandboxrun.memory_usage")

GIB = 1024**3
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages, 0x7FFFFFFFFFFFF000 bytes with 4 KiB
# pages (other page sizes round differently); nothing real is anywhere near 2**62 bytes.
V1_UNLIMITED = 2**62


def bytes_to_gigibytes(num_bytes: int) -> float:
    """Bytes as GiB (1 GiB = 1024**3 bytes), as a float."""
    return num_bytes / GIB


def get_total_memory_usage_in_gib(pid: int | None) -> float:
    """RSS of the process ``pid`` and all its descendants in GiB; 0.0 for ``None`` or a gone pid."""
    if pid is None:
        return 0.0
    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:  # a child that ended between the listing and the read
            continue
    return bytes_to_gigibytes(total)


def get_available_memory_bytes() -> int:
    """Bytes a new task could use: host available memory, capped by every enclosing cgroup."""
    available = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom_bytes()
    return available if headroom is None else min(available, headroom)


def get_available_memory_gib() -> float:
    """``get_available_memory_bytes()`` in GiB: what to divide by a task's need for max_workers."""
    return bytes_to_gigibytes(get_available_memory_bytes())


def cgroup_headroom_bytes() -> int | None:
    """The tightest memory headroom among our cgroups (v2 and v1), or None when none is limited."""
    own = cgroupfs.own_cgroups()
    found: list[int] = []
    for fstype, point, options in cgroupfs.mounts():
        if fstype == "cgroup2" and "" in own:
            found += _headrooms(_own_directory(point, own[""]), point, _v2_headroom)
        elif fstype == "cgroup" and "memory" in options:
            key = next((k for k in own if "memory" in k.split(",")), None)
            if key is not None:
                found += _headrooms(_own_directory(point, own[key]), point, _v1_headroom)
    return min(found) if found else None


def _headrooms(
    directory: Path, point: Path, measure: Callable[[Path], int | None]
) -> Iterator[int]:
    for cgroup in _up_to(directory, point):
        headroom = measure(cgroup)
        if headroom is not None:
            log.debug("memory headroom of %s: %d bytes", cgroup, headroom)
            yield headroom


def _own_directory(point: Path, own: str) -> Path:
    """Our cgroup's directory under ``point``; the longest tail of ``own`` found there."""
    parts = [part for part in own.split("/") if part]
    for start in range(len(parts)):
        candidate = point.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return point


def _up_to(directory: Path, point: Path) -> Iterator[Path]:
    """``directory``, then each parent, ending with the mount point (the hierarchy's root)."""
    yield directory
    while directory != point and directory.parent != directory:
        directory = directory.parent
        yield directory


def _v2_headroom(cgroup: Path) -> int | None:
    limits = [
        value
        for value in (
            cgroupfs.read_int(cgroup / "memory.max"),  # "max" reads as None: no limit
            cgroupfs.read_int(cgroup / "memory.high"),  # above it the kernel throttles hard
        )
        if value is not None
    ]
    if not limits:
        return None
    used = cgroupfs.read_int(cgroup / "memory.current") or 0
    cache = cgroupfs.read_keyed(cgroup / "memory.stat").get("inactive_file", 0)
    return max(0, min(limits) - max(0, used - cache))


def _v1_headroom(cgroup: Path) -> int | None:
    limit = cgroupfs.read_int(cgroup / "memory.limit_in_bytes")
    if limit is None or limit >= V1_UNLIMITED:
        return None
    used = cgroupfs.read_int(cgroup / "memory.usage_in_bytes") or 0
    cache = cgroupfs.read_keyed(cgroup / "memory.stat").get("total_inactive_file", 0)
    return max(0, limit - max(0, used - cache))
