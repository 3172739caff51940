"""How many CPUs this process may really use: affinity, then any cgroup CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _quota_v2(path: Path) -> float | None:
    try:
        quota, period = (path / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(path: Path) -> float | None:
    try:
        quota = int((path / "cpu.cfs_quota_us").read_text())
        period = int((path / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period


def _cgroup_quota() -> float | None:
    """The smallest CPU quota on the path from this process's cgroup up to the root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if controllers == "":
            base, reader = Path("/sys/fs/cgroup"), _quota_v2
            if not (base / "cgroup.controllers").exists():
                base = Path("/sys/fs/cgroup/unified")
        elif "cpu" in controllers.split(","):
            base, reader = Path("/sys/fs/cgroup/cpu"), _quota_v1
            if not base.exists():
                base = Path("/sys/fs/cgroup") / controllers
        else:
            continue
        path = base / relative.lstrip("/")
        while True:
            quota = reader(path)
            if quota is not None:
                quotas.append(quota)
            if path == base or path.parent == path:
                break
            path = path.parent
    return min(quotas) if quotas else None


def available_cpus() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)
