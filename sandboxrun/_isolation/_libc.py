"""The Linux syscalls isolation needs and Python 3.10/3.11 lacks, worded as ``os`` does.

``os.unshare`` arrived in 3.12; ``mount``, ``mount_setattr``, ``capset`` and the capability
``prctl`` calls are in no stdlib. They are made by ``sandboxrun._syscalls`` (compiled, or
ctypes); each wrapper here raises ``OSError`` with the errno and what was asked. Constants from
the uapi headers (``linux/sched.h``, ``linux/mount.h``, ``linux/prctl.h``).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import functools
import os

from .. import _syscalls

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_RECURSIVE = 0x8000

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

def _check(error: int, what: str, path: str | None = None) -> None:
    if error:
        raise OSError(error, f"{what}: {os.strerror(error)}", path)


def unshare(flags: int) -> None:
    _check(_syscalls.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_syscalls.setns(fd, nstype), f"setns({fd}, {nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    error = _syscalls.mount(source, target, fstype, flags, data or None)
    _check(error, f"mount({source!r}, {fstype!r}, {flags:#x}, {data!r})", target)


def mount_setattr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None:
    """mount_setattr(2) (5.12): change the flags of the mount at ``path`` (and below it)."""
    flags = AT_RECURSIVE if recursive else 0
    _check(_syscalls.mount_setattr(path, attr_set, attr_clr, flags), "mount_setattr", path)


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_syscalls.prctl(option, arg2, arg3), f"prctl({option})")


def capset_empty() -> None:
    """Clear the effective, permitted and inheritable sets of this thread (capset(2), v3)."""
    _check(_syscalls.capset_empty(), "capset")


@functools.cache  # the kernel's: read once (in the zygote, see _mounts.prepare_view)
def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one of 5.9+: dropping unknown ones is EINVAL
