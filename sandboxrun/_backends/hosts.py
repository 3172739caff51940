"""What kind of cgroup host this is, judged in one place for every backend and for ``doctor``.

Three layouts exist (systemd's names): *unified* (only cgroup2, which holds the controllers),
*hybrid* (the controllers on v1 mounts, an empty cgroup2 beside them, often
``/sys/fs/cgroup/unified``) and *legacy* (only v1).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path

from . import cgroupfs

#: sd_booted(): systemd creates this directory when it is PID 1.
SYSTEMD_RUN_DIR = Path("/run/systemd/system")


def systemd_booted() -> bool:
    return SYSTEMD_RUN_DIR.is_dir()


def controllers(path: Path, name: str = "cgroup.controllers") -> set[str]:
    """The controller names in a cgroup v2 list file (``cgroup.controllers``,
    ``cgroup.subtree_control``); empty when it cannot be read."""
    try:
        return set(cgroupfs.read(path / name).split())
    except OSError:
        return set()


@dataclasses.dataclass(frozen=True)
class CgroupHost:
    v2_mount: Path | None  # the first cgroup2 mount
    v2_controllers: frozenset[str]  # what its root offers
    v1_controllers: frozenset[str]  # the super options of every v1 mount (controller names)
    has_v1: bool

    @property
    def layout(self) -> str:
        """``"unified"``, ``"hybrid"``, ``"legacy"`` or ``"none"``."""
        if self.v2_mount is not None:
            return "hybrid" if self.has_v1 else "unified"
        return "legacy" if self.has_v1 else "none"

    def v2_missing(self, required: Iterable[str]) -> list[str]:
        return [name for name in required if name not in self.v2_controllers]

    def v2_lacks(self, required: Iterable[str]) -> str | None:
        """``None`` when the cgroup2 root offers every ``required`` controller, else why not
        (naming a hybrid host, where cgroup v1 holds the missing controllers)."""
        if self.v2_mount is None:
            return "no cgroup2 filesystem is mounted"
        missing = self.v2_missing(required)
        if not missing:
            return None
        held = set(missing) & self.v1_controllers
        why = f" (hybrid host: cgroup v1 holds {'it' if len(held) == 1 else 'them'})"
        return (
            f"cgroup2 at {self.v2_mount} has no {' or '.join(missing)} "
            f"controller{'s' if len(missing) > 1 else ''}{why if held else ''}"
        )


def cgroup_host() -> CgroupHost:
    found = cgroupfs.mounts()
    v2 = next((mount.point for mount in found if mount.fstype == "cgroup2"), None)
    v1 = [mount for mount in found if mount.fstype == "cgroup"]
    offered: set[str] = set()
    if v2 is not None:
        with contextlib.suppress(OSError):
            offered = controllers(v2)
    return CgroupHost(
        v2_mount=v2,
        v2_controllers=frozenset(offered),
        v1_controllers=frozenset(option for mount in v1 for option in mount.options),
        has_v1=bool(v1),
    )
