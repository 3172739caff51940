"""The few Linux process controls the worker and the command runner need (no-ops elsewhere)."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

if sys.platform.startswith("linux"):
    from . import _syscalls  # compiled where built, else ctypes: chosen once, here


def prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        _syscalls.prctl(option, value)  # best effort, as before: an errno is ignored


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (so nothing runs on unwatched)."""
    if sys.platform != "win32":
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_subreaper() -> None:
    """Orphaned descendants get re-parented to this process instead of init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000


def unshare(flags: int) -> None:
    """``unshare(2)`` (``os.unshare`` exists only from Python 3.12); raises ``OSError``."""
    error = 38  # ENOSYS
    if sys.platform.startswith("linux"):
        error = _syscalls.unshare(flags)
    if error:
        raise OSError(error, f"unshare({flags:#x}): {os.strerror(error)}")


def setns(fd: int, nstype: int) -> None:
    """``setns(2)`` (``os.setns`` exists only from Python 3.12); raises ``OSError``."""
    error = 38
    if sys.platform.startswith("linux"):
        error = _syscalls.setns(fd, nstype)
    if error:
        raise OSError(error, f"setns({fd}, {nstype:#x}): {os.strerror(error)}")


def own_user_namespace() -> None:
    """Non-root: enter a user namespace that maps our uid and gid to themselves.

    Its creator holds every capability *in* it (none outside): enough to make a PID, mount or
    cgroup namespace owned by it, which an unprivileged process may not do in the host's. The
    ids stay what they were (``os.geteuid()`` unchanged, files keep their owners); a
    single-threaded caller only (the kernel refuses CLONE_NEWUSER otherwise). Raises
    ``OSError`` where the kernel forbids unprivileged user namespaces.
    """
    if sys.platform == "win32":
        raise OSError(38, "no user namespaces on Windows")
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1"),
                       ("uid_map", f"{uid} {uid} 1")):  # fmt: skip
        # setgroups before gid_map (CVE-2014-8989: a group dropped must stay dropped).
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)


def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in our effective set (root, or the creator of our user namespace)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 21 & 1)
    return False
