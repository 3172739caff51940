"""Task isolation (issue 12): namespaces, read-only views, no capabilities, another uid.

A library of ordered steps the launcher calls; see docs/security.md for what each stops::

    manager:  resolve(isolation=...) -> Isolation        (profile.py, portable)
              build_environment(profile, env)            (environment.py, portable)
    zygote:   prepare_view(profile)                      (_view.py: what is not per task, built
                                                          once in a mount namespace it holds)
    PID 2:    setup_namespaces_and_mounts(profile, True) (_mounts.py: root, in the task's pid
                                                          namespace and cgroups, one thread;
                                                          a copy of the view, then /proc, /tmp)
              isolate_cgroups(profile)                   (_cgroupns.py: once the manager has
                                                          placed us, before the task's code)
              drop_privileges(profile, slot)             (_privileges.py: just before task code)
    doctor:   probe() -> {measure: True | why not}       (_probe.py: in a throwaway child)

Linux only below the profile; elsewhere ``probe()`` says so and the manager accepts only
``isolation="none"`` (the psutil monitor is a resource limiter, not a boundary).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .. import _log
from .environment import build_environment, matcher, replace_environment
from .profile import DEFAULT, NONE, PROFILES, STRICT, Isolation, resolve

if sys.platform.startswith("linux"):
    from ._cgroupns import enter_cgroup_namespace
    from ._mounts import IsolationError, prepare_view, setup_namespaces_and_mounts
    from ._privileges import drop_privileges

__all__ = [
    "DEFAULT",
    "NONE",
    "PROFILES",
    "STRICT",
    "Isolation",
    "IsolationError",
    "build_environment",
    "choose",
    "describe",
    "drop_privileges",
    "isolate_cgroups",
    "prepare_view",
    "probe",
    "replace_environment",
    "resolve",
    "setup_namespaces_and_mounts",
    "start_method_reason",
    "unavailable_reason",
]  # fmt: skip

#: The measures each profile needs from probe(), in the order the steps run.
_NEEDS: dict[str, Callable[[Isolation, bool], bool]] = {
    "user_namespace": lambda p, root: not root,
    "mount_namespace": lambda p, root: True,
    "fresh_proc": lambda p, root: True,
    "private_tmp": lambda p, root: p.private_tmp,
    "read_only_system": lambda p, root: p.protect_system is not None,
    "protect_kernel_tunables": lambda p, root: p.protect_kernel_tunables,
    "cgroup_namespace": lambda p, root: p.private_cgroups,
    "network_namespace": lambda p, root: p.private_network,
    "loopback": lambda p, root: p.private_network,
    "private_dev": lambda p, root: p.private_dev,
    "drop_capabilities": lambda p, root: p.drop_capabilities,
    "no_new_privileges": lambda p, root: p.no_new_privileges,
    "slot_uid_reads_python": lambda p, root: root and p.user is not None,
    "seccomp": lambda p, root: p.seccomp,
}


def isolate_cgroups(profile: Isolation) -> None:
    """The task's own cgroup namespace and cgroupfs view (``private_cgroups``), where on."""
    if sys.platform.startswith("linux") and profile.enabled and profile.private_cgroups:
        enter_cgroup_namespace()


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


_warned: set[str] = set()


def choose(
    value: str | Isolation | None, start_method: str = "zygote", start_chosen: bool = False
) -> Isolation:
    """``ProcessManager(isolation=..., start_method=...)``: the profile to use here.

    ``None`` means ``$SANDBOXRUN_ISOLATION`` if set (an operator's default for every manager
    that does not choose), else ``"default"``. Asked for by name or instance and not possible
    here: ``ValueError`` saying which measure is missing (no silent weaker sandbox). Only the
    zygote start method gives a profile (each task PID 2 of its own PID namespace, below a
    reaper); a profile with ``start_method`` fork, spawn or forkserver chosen on purpose is
    refused naming the zygote. Left to the default and not possible (macOS, Windows, a kernel
    or container that forbids namespaces, the portable transport): ``"none"``, with one warning
    per process naming the reason (``sandboxrun doctor`` explains the fix).
    """
    import os

    default = os.environ.get("SANDBOXRUN_ISOLATION") or None  # the operator's default profile
    profile = resolve(value if value is not None else default)
    reason = unavailable_reason(profile)
    if reason is None and profile.enabled:
        reason = start_method_reason(start_method)
        if reason is not None and (start_chosen or value is not None or default is not None):
            raise ValueError(
                f"isolation={profile.name!r} {reason}; use start_method='zygote' (the default"
                f" on Linux), or pass isolation='none' to run start_method={start_method!r}"
                " tasks unisolated on purpose"
            )
    if reason is None:
        if profile.environment is not None:
            matcher(profile.environment)  # compiled here, inherited by every forked worker
        return profile
    if value is not None:
        raise ValueError(
            f"isolation={profile.name!r} cannot be had here ({reason}); run `sandboxrun doctor`"
            " for the fix, or pass isolation='none' to run tasks unisolated on purpose"
        )
    if sys.platform.startswith("linux") and reason not in _warned:
        _warned.add(reason)
        _log.get("sandboxrun.isolation").warning(
            "tasks run WITHOUT isolation (isolation='none'): %s. A compromised task can reach"
            " this process and the host as its uid; see `sandboxrun doctor`",
            reason,
        )
    return NONE


def start_method_reason(start_method: str) -> str | None:
    """Why ``start_method`` cannot give a profile, or None (the zygote)."""
    if start_method == "zygote":
        return None
    return (
        f"start_method={start_method!r} cannot give it: only the zygote forks each task into a"
        " PID namespace of its own below a reaper (fork, spawn and forkserver workers share this"
        " process's PID namespace, uid and terminal)"
    )


def describe(profile: Isolation) -> str:
    """What TaskResult.isolation records: the profile's name (``custom`` for a hand-built one)."""
    return profile.name
