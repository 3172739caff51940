"""The task's own cgroup namespace, with a cgroupfs that shows only its own cgroup.

Why (research/isolation.md §4.5, measured): on cgroup v2 a read-only cgroupfs does not keep a
root task in its cgroup -- ``clone3(CLONE_INTO_CGROUP, fd)`` checks write permission on the
target's ``cgroup.procs`` inode (owned by uid 0), never the mount's read-only flag, so a capless
root task could start a child in its parent cgroup, outside every limit and the tree kill. A
cgroup namespace alone does not stop it either (without ``nsdelegate`` the kernel checks only
permissions): what does is that the task cannot *name* any cgroup outside its own. So, after
the task's process is in its cgroups and before the task exists:

    unshare(CLONE_NEWCGROUP)                our cgroup becomes the namespace's root "/"
    over each cgroup2 mount: an empty       the same superblock cannot be mounted on the
      tmpfs, then cgroup2 (read-only,       root of its own mount (EBUSY)
      nosuid, nodev, noexec)                a fresh view: from inside the namespace it shows
                                            our cgroup as its root, nothing above or beside

The covered host mount stays underneath, reachable only through an fd or a cwd opened before
(the task holds none: fds are closed, the cwd is the task's) or by unmounting the new one
(CAP_SYS_ADMIN, dropped). Where the hierarchy is mounted with ``nsdelegate`` (systemd does so)
the kernel refuses moves across the namespace's root as well: a second wall. v1 hierarchies
need nothing more: CLONE_INTO_CGROUP takes only a v2 directory, and their read-only mount
stops every ``cgroup.procs`` write. This is systemd's ``ProtectControlGroups=strict`` (v257).

It runs in the process that forks the task (the zygote's PID 1, or the fork launcher's worker
itself) and only after the manager has placed it: a namespace rooted before the move would be
rooted at the zygote's cgroup.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it


from .. import _log
from .._backends import cgroupfs
from . import _libc as libc

log = _log.get("sandboxrun.isolation")

_FLAGS = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC


def cgroup2_mount_points() -> list[str]:
    """Mount points of cgroup2 in this mount namespace (cgroupfs's mountinfo parser)."""
    points = [point for kind, point, _ in cgroupfs.cgroup_mount_lines() if kind == "cgroup2"]
    return list(dict.fromkeys(points))


def enter_cgroup_namespace() -> None:
    """Root a new cgroup namespace at our cgroup and cover every cgroup2 mount with a view of it.

    Call in our own mount namespace, with CAP_SYS_ADMIN, after the cgroups are entered."""
    points = cgroup2_mount_points()
    libc.unshare(libc.CLONE_NEWCGROUP)
    for point in points:
        # The kernel refuses the same superblock on the root of its own mount (EBUSY, "already
        # mounted"), and unmounting the host's is refused in a user namespace (locked mounts):
        # an empty tmpfs goes between, then the new view on top of it.
        libc.mount("tmpfs", point, "tmpfs", _FLAGS, "size=4k,mode=555")
        libc.mount("cgroup2", point, "cgroup2", _FLAGS)
        log.debug("cgroup2 on %s: a read-only view rooted at the task's cgroup", point)
