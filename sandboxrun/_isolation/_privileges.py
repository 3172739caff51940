"""No way back: run in PID 2 (the task) just before task code, after the namespaces exist.

Order (systemd exec-invoke.c, nsjail contain.cc; research/isolation.md §6, §11.2 steps 13-18)::

    rlimits, hard = soft     a capless process can lower a hard limit, never raise it
    ambient cleared          ambient caps survive execve of ordinary programs
    bounding set emptied     needs CAP_SETPCAP: before the uid change. Without it a uid-0 task
                             regains every capability on its next execve
    setgroups / setresgid / setresuid   (a different uid owns no cgroup file and cannot
                             signal or ptrace the manager; the kernel clears caps on the change)
    PR_SET_DUMPABLE 1        our own /proc/self back (the uid change took it)
    capset(empty)            what is left for a task that stays uid 0
    PR_SET_NO_NEW_PRIVS      set-uid bits and file caps inert from here on
    seccomp filter           last: it refuses mount, unshare, setns... (_seccomp.py); compiled
                             once in the zygote, loaded here in the task's own process

The result and control pipes are already-open fds: they keep working after the uid change.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import os
import resource

from .. import _log
from . import _libc as libc
from . import _seccomp
from ._mounts import IsolationError
from .profile import Isolation

log = _log.get("sandboxrun.isolation")


def _rlimits(profile: Isolation) -> None:
    for limit, value in (
        (resource.RLIMIT_CORE, profile.core),
        (resource.RLIMIT_NOFILE, profile.max_open_files),
        (resource.RLIMIT_FSIZE, profile.max_file_size),
    ):
        if value is not None:
            resource.setrlimit(limit, (value, value))


def drop_bounding_set() -> None:
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(libc.cap_last_cap() + 1):
        try:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        except OSError as error:
            if error.errno != 22:  # EINVAL: a cap this kernel does not know
                raise


def _switch_user(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def drop_privileges(profile: Isolation, slot: int = 0) -> None:
    """Lower this process to what the profile allows; ``slot`` picks the per-slot uid."""
    if not profile.enabled:
        return
    try:
        _rlimits(profile)
        root = os.geteuid() == 0
        if profile.drop_capabilities and root:
            drop_bounding_set()
        ids = profile.uid_gid(slot)
        if ids is not None and root and _mapped(ids):
            _switch_user(*ids)
            # The uid change made us non-dumpable: /proc/self would be root's, and the task
            # could not list its own fds or name itself. bubblewrap sets it back likewise; no
            # other process has our uid (a slot's), and ptrace is filtered anyway.
            libc.prctl(libc.PR_SET_DUMPABLE, 1)
        if profile.drop_capabilities:
            libc.capset_empty()
        if profile.no_new_privileges:
            libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
        if profile.seccomp:
            _seccomp.load(_seccomp.program(), profile.seccomp_log)
    except OSError as error:
        raise IsolationError(error.errno, f"dropping privileges failed: {error}") from error
    log.debug("privileges dropped: uid %s, slot %s", os.geteuid(), slot)


def task_ids(profile: Isolation, slot: int) -> tuple[int, int] | None:
    """In the manager: the (uid, gid) ``drop_privileges`` will give the task of ``slot``, or
    None when it keeps the manager's (no ``user``, a non-root manager, a single-id namespace).
    A root manager's task stays in the manager's user namespace, so the same checks hold."""
    if not profile.enabled or os.geteuid() != 0:
        return None
    ids = profile.uid_gid(slot)
    return ids if ids is not None and _mapped(ids) else None


def _mapped(ids: tuple[int, int]) -> bool:
    """In a single-id user namespace (non-root manager) only uid 0 exists: stay it."""
    with contextlib.suppress(OSError):
        with open("/proc/self/uid_map") as file:
            first = file.read().split()
        if first[:3] != ["0", "0", "4294967295"]:
            log.debug("no uid %s in this user namespace: the task keeps the manager's", ids[0])
            return False
    return True


def status() -> dict[str, str]:
    """This process's credentials, as /proc/self/status shows them (for probes and tests)."""
    wanted = ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh", "NoNewPrivs")
    found = {}
    with open("/proc/self/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = value.strip()
    return found
