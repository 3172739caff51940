"""How many CPUs this process may really use: affinity, then any cgroup CPU quota.

The quota is the smallest on the path from this process's cgroup up to its hierarchy's mount:
cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``), cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1``: none).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ._backends import cgroupfs


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = cgroupfs.read(path / "cpu.max").split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _quota_v1(path: Path) -> float | None:
    quota = cgroupfs.read_int(path / "cpu.cfs_quota_us")
    period = cgroupfs.read_int(path / "cpu.cfs_period_us")
    if quota is None or not period or quota <= 0:
        return None
    return quota / period


def _hierarchies() -> list[tuple[Path, Path, Callable[[Path], float | None]]]:
    """(mount point, own cgroup directory, quota reader) of each hierarchy with a CPU quota."""
    own = cgroupfs.own_cgroups()
    found: list[tuple[Path, Path, Callable[[Path], float | None]]] = []
    for mount in cgroupfs.mounts():
        if mount.fstype == "cgroup2" and "" in own:
            found.append((mount.point, mount.point / own[""].lstrip("/"), _quota_v2))
        elif mount.fstype == "cgroup" and "cpu" in mount.options:
            key = next((k for k in own if "cpu" in k.split(",")), None)
            if key is not None:
                found.append((mount.point, mount.point / own[key].lstrip("/"), _quota_v1))
    return found


def cgroup_quota() -> float | None:
    """The smallest CPU quota (in CPUs) on the path from this process's cgroups up."""
    quotas: list[float] = []
    for mount, path, reader in _hierarchies():
        while True:
            quota = reader(path)
            if quota is not None:
                quotas.append(quota)
            if path == mount or mount not in path.parents:
                break
            path = path.parent
    return min(quotas) if quotas else None


def affinity_count() -> int:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_cpus() -> int:
    count = affinity_count()
    quota = cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)
