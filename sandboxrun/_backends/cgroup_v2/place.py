"""Where the cgroup v2 backend may live: the cgroup2 mount, the delegated root, and whether
this process must move out of that root first. Only reads; nothing here writes cgroupfs.

``<root>`` is ``$SANDBOXRUN_CGROUP_ROOT`` (a delegated cgroup, e.g. a systemd unit with
``Delegate=yes``) or else this process's own cgroup. Nothing above ``<root>`` is ever written.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import dataclasses
import os
from pathlib import Path

from .. import cgroupfs, hosts

ROOT_ENV = "SANDBOXRUN_CGROUP_ROOT"
REQUIRED = ("memory", "pids")
OPTIONAL = ("cpu",)  # for cpu.max (cpu_quota) and cpu.stat's throttling; never required


@dataclasses.dataclass(frozen=True)
class Place:
    """The cgroup2 mount, the root, and what ``open()`` must do there."""

    mount: Path
    root: Path
    move_self: bool  # root holds this process: leave it for runner/supervisor


def read_type(path: Path) -> str | None:
    try:
        return cgroupfs.read(path / "cgroup.type")
    except OSError:
        return None  # the root cgroup has no cgroup.type


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_ours(pid: int) -> bool:
    """This process or one of its descendants (e.g. a forkserver it started)."""
    me, seen = os.getpid(), 0
    while pid > 1 and seen < 64:
        if pid == me:
            return True
        pid, seen = _parent_pid(pid) or 0, seen + 1
    return False


def undelegated_unit(mount: Path, path: Path) -> Path | None:
    """The systemd unit cgroup holding ``path`` when systemd did not delegate it to us, else None.

    systemd marks the cgroup of a unit with ``Delegate=yes`` with the xattr ``trusted.delegate``
    (``user.delegate`` too since v251). Cgroups made below a unit without it fight systemd
    (docs/CGROUP_DELEGATION.md). Only judged as root: unprivileged, such a cgroup is not writable
    anyway, or it belongs to the user's own manager, which may not mark delegation.
    """
    if os.geteuid() != 0 or not hosts.systemd_booted():
        return None
    probe = path
    while probe != mount and mount in probe.parents:
        if probe.name.endswith((".service", ".scope")):
            for name in ("trusted.delegate", "user.delegate"):
                with contextlib.suppress(OSError):
                    if os.getxattr(probe, name) == b"1":
                        return None
            return probe
        probe = probe.parent
    return None


def _root(mount: Path, own_path: Path, active: Place | None) -> Path | str:
    configured = os.environ.get(ROOT_ENV)
    if not configured:
        return active.root if active is not None else own_path  # moved below it: still ours
    root = Path(configured)
    if not root.is_absolute():
        return f"{ROOT_ENV}={configured} is not an absolute path"
    if mount not in root.parents and root != mount:  # also accept a path inside the hierarchy
        root = mount / configured.lstrip("/")
    if not (root / "cgroup.procs").is_file():
        return f"{ROOT_ENV}={configured} is not a cgroup under {mount}"
    return root


def locate(active: Place | None = None) -> Place | str:
    """A usable place, or a sentence saying why there is none. ``active``: the place of this
    process's runner, when it has one (it has moved itself below its root)."""
    host = hosts.cgroup_host()
    lacks = host.v2_lacks(REQUIRED)
    if lacks is not None or host.v2_mount is None:
        return lacks or "no cgroup2 filesystem is mounted"
    mount = host.v2_mount
    own = cgroupfs.own_cgroups().get("")
    if own is None:
        return "this process is in no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)"
    own_path = mount / own.lstrip("/")
    if not (own_path / "cgroup.procs").is_file():
        return f"own cgroup {own} is not visible under {mount} (another cgroup namespace?)"
    root = _root(mount, own_path, active)
    if isinstance(root, str):
        return root
    if active is not None and active.root == root:
        return active
    return _judge(mount, own_path, root)


def _judge(mount: Path, own_path: Path, root: Path) -> Place | str:
    configured = bool(os.environ.get(ROOT_ENV))
    which = f"{ROOT_ENV} cgroup {root}" if configured else f"own cgroup {root}"
    unit = None if configured else undelegated_unit(mount, root)
    if unit is not None:
        return (
            f"{which} belongs to systemd unit {unit.name}, which is not delegated (no "
            "Delegate=yes): use backend 'systemd', run under `systemd-run -p Delegate=yes`, or "
            f"set {ROOT_ENV} to a delegated cgroup"
        )
    missing = [name for name in REQUIRED if name not in hosts.controllers(root)]
    if missing:
        return (
            f"{which} lacks the {' and '.join(missing)} controller: its parent does not delegate "
            f"it ({root.parent}/cgroup.subtree_control)"
        )
    kind = read_type(root)
    if kind not in ("domain", None):
        return f"{which} is a {kind} cgroup, not a domain one"
    if not os.access(root, os.W_OK):
        return f"{which} is not writable"
    move_self = False
    if not set(REQUIRED) <= hosts.controllers(root, "cgroup.subtree_control"):
        if not os.access(root / "cgroup.subtree_control", os.W_OK):
            return f"{which} is not writable (cgroup.subtree_control)"
        procs = cgroupfs.pids(root) if root != mount else []
        others = [pid for pid in procs if not _is_ours(pid)]
        if others:
            return (
                f"{which} holds other processes ({', '.join(map(str, others[:5]))}): run under "
                f"`systemd-run --scope -p Delegate=yes` or set {ROOT_ENV} to a delegated cgroup"
            )
        if procs:
            if not os.access(root / "cgroup.procs", os.W_OK):
                return f"{which} is not writable (cgroup.procs)"
            move_self = True
    # Moving a worker in needs write access to cgroup.procs of the common ancestor.
    common = Path(os.path.commonpath([own_path, root]))
    if not os.access(common / "cgroup.procs", os.W_OK):
        return (
            f"workers cannot be moved from {own_path} into {root}: {common}/cgroup.procs is not "
            f"writable; set {ROOT_ENV} to a delegated cgroup that contains this process"
        )
    return Place(mount, root, move_self)
