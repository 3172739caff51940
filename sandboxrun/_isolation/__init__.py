"""Task isolation (issue 12): namespaces, read-only views, no capabilities, another uid.

A library of ordered steps the launcher calls; see docs/security.md for what each stops::

    manager:  resolve(isolation=...) -> Isolation        (profile.py, portable)
              build_environment(profile, env)            (environment.py, portable)
    PID 1:    setup_namespaces_and_mounts(profile)       (_mounts.py: root, in the task's pid
                                                          namespace and cgroups, one thread)
    PID 2:    drop_privileges(profile, slot)             (_privileges.py: just before task code)
    doctor:   probe() -> {measure: True | why not}       (_probe.py: in a throwaway child)

Linux only below the profile; elsewhere ``probe()`` says so and the manager accepts only
``isolation="none"`` (the psutil monitor is a resource limiter, not a boundary).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .environment import build_environment, replace_environment
from .profile import DEFAULT, NONE, PROFILES, STRICT, Isolation, resolve

__all__ = [
    "DEFAULT", "NONE", "PROFILES", "STRICT", "Isolation", "build_environment", "describe",
    "probe", "replace_environment", "resolve", "unavailable_reason",
]  # fmt: skip

#: The measures each profile needs from probe(), in the order the steps run.
_NEEDS: dict[str, Callable[[Isolation, bool], bool]] = {
    "user_namespace": lambda p, root: not root,
    "mount_namespace": lambda p, root: True,
    "fresh_proc": lambda p, root: True,
    "private_tmp": lambda p, root: p.private_tmp,
    "read_only_system": lambda p, root: p.protect_system is not None,
    "protect_kernel_tunables": lambda p, root: p.protect_kernel_tunables,
    "network_namespace": lambda p, root: p.private_network,
    "loopback": lambda p, root: p.private_network,
    "drop_capabilities": lambda p, root: p.drop_capabilities,
    "no_new_privileges": lambda p, root: p.no_new_privileges,
    "slot_uid_reads_python": lambda p, root: root and p.user is not None,
}


def probe(refresh: bool = False) -> dict[str, bool | str]:
    """{measure: True, or why it does not work here}."""
    if sys.platform.startswith("linux"):
        from ._probe import probe as linux_probe

        return linux_probe(refresh)
    return {"namespaces": f"Linux only ({sys.platform} here)"}


def unavailable_reason(profile: Isolation) -> str | None:
    """None when every measure ``profile`` needs works here; else the first missing one."""
    if not profile.enabled:
        return None
    found = probe()
    if not sys.platform.startswith("linux"):
        return str(found["namespaces"])
    import os

    root = os.geteuid() == 0
    for measure, needed in _NEEDS.items():
        if needed(profile, root) and found.get(measure) is not True:
            return f"{measure}: {found.get(measure, 'not probed')}"
    return None


def describe(profile: Isolation) -> str:
    """What TaskResult.isolation records: the profile's name (``custom`` for a hand-built one)."""
    return profile.name
