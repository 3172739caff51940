"""The systemd backend: transient scopes through pystemd, so no manual delegation is needed.

For hosts where systemd is PID 1 but nothing delegates a cgroup to this process (a plain
service, a login session, a cron job): systemd itself hands out a delegated cgroup. Two modes
(``scope_mode``, env ``SANDBOXRUN_SYSTEMD_SCOPE_MODE``):

- ``"runner"`` (default, ``runner_scope.py``): one scope for this process, and inside it the
  cgroup v2 runner (a ``RunnerSession``): the per-task work is exactly the cgroup v2 backend's.
- ``"task"`` (``task_scope.py``): one transient scope per task, the limits as unit properties.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import importlib
import os
from pathlib import Path
from typing import Any

from ..._errors import BackendUnavailable
from ..._limits import Limits, validate_cpu_quota
from .. import hosts
from ..base import Backend, Sandbox
from ..cgroup_v2 import RunnerSession
from ..cgroup_v2.counters import KERNEL_ENFORCED
from ..cgroup_v2.place import REQUIRED, Place
from ..cgroup_v2.runner import Runner
from .bus import PREFIX, Bus, Target, target
from .runner_scope import SelfScope
from .task_scope import TaskScopes

SLICE_ENV = "SANDBOXRUN_SYSTEMD_SLICE"
MODE_ENV = "SANDBOXRUN_SYSTEMD_SCOPE_MODE"
DEFAULT_SLICE = "sandboxrun.slice"
MODES = ("runner", "task")
INSTALL_HINT = "pip install 'sandboxrun[systemd]' (needs libsystemd-dev, pkg-config, gcc)"


def host_reason() -> str | None:
    """Cheap checks without the bus: systemd is PID 1, the hierarchy is pure cgroup v2."""
    if not hosts.systemd_booted():
        return f"systemd is not PID 1 (no {hosts.SYSTEMD_RUN_DIR})"
    host = hosts.cgroup_host()
    lacks = host.v2_lacks(REQUIRED)
    if lacks is not None:
        return f"not {'pure ' if host.v2_mount is not None else ''}cgroup v2: {lacks}"
    return None


def check_slice(name: str) -> str:
    if not name.endswith(".slice") or "/" in name or len(name) <= len(".slice"):
        raise ValueError(f"not a systemd slice name: {name!r} (example: {DEFAULT_SLICE})")
    return name


def probe() -> str | dict[str, Any]:
    """A sentence why not, or facts about the manager. Reads only (and asks the bus)."""
    reason = host_reason()
    if reason is not None:
        return reason
    try:
        importlib.import_module("pystemd.dbuslib")
    except ImportError as error:
        return f"pystemd is not installed ({error}): {INSTALL_HINT}"
    where = target()
    if isinstance(where, str):
        return where
    try:
        with Bus(where) as bus:
            version = bytes(bus.manager_property(b"Version", b"s")).decode()
            cgroup = bytes(bus.manager_property(b"ControlGroup", b"s")).decode()
    except Exception as error:
        who = "the user manager" if where.user else "the system manager"
        return f"no bus for this user: {who} does not answer on {where.where} ({error})"
    facts: dict[str, Any] = {"systemd": version, "bus": where.where, "manager_cgroup": cgroup}
    mount = hosts.cgroup_host().v2_mount
    if where.user and mount is not None:
        manager = mount / cgroup.lstrip("/")
        missing = [n for n in REQUIRED if n not in hosts.controllers(manager)]
        if missing:
            return (
                f"the user manager's cgroup {manager} is not delegated the "
                f"{' and '.join(missing)} controller (user@.service needs Delegate=yes)"
            )
    return facts


class SystemdBackend(Backend):
    """Kernel-enforced limits in a cgroup that systemd delegates (see the module docstring)."""

    name = "systemd"
    enforceable = KERNEL_ENFORCED

    _probes: dict[tuple[object, ...], str | dict[str, Any]] = {}

    def __init__(
        self,
        scope_mode: str | None = None,
        slice_name: str | None = None,
        cpu_quota: float | None = None,
    ) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'systemd' cannot work here: {reason}")
        mode = scope_mode or os.environ.get(MODE_ENV) or "runner"
        if mode not in MODES:
            raise ValueError(f"scope_mode must be one of {', '.join(MODES)}, got {mode!r}")
        cpu_quota = validate_cpu_quota(cpu_quota)  # every task scope's, unless the task has one
        self.scope_mode = mode
        self.slice = check_slice(slice_name or os.environ.get(SLICE_ENV) or DEFAULT_SLICE)
        self.cpu_quota = cpu_quota
        where, mount = target(), hosts.cgroup_host().v2_mount
        if isinstance(where, str) or mount is None:
            raise BackendUnavailable(f"backend 'systemd' cannot work here: {where}, {mount}")
        self.target: Target = where
        self.mount = mount
        self.session = RunnerSession(Place(mount, mount, move_self=True))  # the real one: open()
        self.scopes = TaskScopes(where, mount, self.slice, cpu_quota)
        self._scope: SelfScope | None = None

    # ------------------------------------------------------------ detection

    @classmethod
    def _key(cls) -> tuple[object, ...]:
        env = os.environ
        return (
            os.geteuid(),
            env.get("XDG_RUNTIME_DIR"),
            env.get("DBUS_SESSION_BUS_ADDRESS"),
            env.get("DBUS_SYSTEM_BUS_ADDRESS"),
        )

    @classmethod
    def _verdict(cls) -> str | dict[str, Any]:
        key = cls._key()
        if key not in cls._probes:
            cls._probes[key] = probe()
        return cls._probes[key]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        verdict = cls._verdict()
        return verdict if isinstance(verdict, str) else None

    @property
    def kernel_enforced(self) -> frozenset[str]:
        part = self.session if self.scope_mode == "runner" else self.scopes
        return part.kernel_enforced

    @property
    def runner_path(self) -> Path | None:
        """The cgroup v2 runner inside this process's scope while open (runner mode)."""
        return self.session.path

    @property
    def runner_dirs(self) -> list[Path]:
        """The cgroups this backend made that close() removes: the runner (runner mode), the
        task scopes not yet removed (task mode; systemd drops each once it is empty)."""
        if self.scope_mode == "task":
            return [sandbox.path for sandbox in self.scopes.live.values()]
        return [] if self.session.path is None else [self.session.path]

    @property
    def unit(self) -> str | None:
        """This process's own scope while open (runner mode)."""
        return None if self._scope is None else self._scope.unit

    @property
    def scope_path(self) -> Path | None:
        return None if self._scope is None else self._scope.path

    def details(self) -> dict[str, object]:
        verdict = self._verdict()
        facts: dict[str, object] = dict(verdict) if isinstance(verdict, dict) else {}
        facts.update(
            {
                "scope_mode": self.scope_mode,
                "slice": self.slice,
                "manager": "user" if self.target.user else "system",
                "unit": (
                    f"{PREFIX}<pid>-<rand>.scope, once per process"
                    if self.scope_mode == "runner"
                    else f"{PREFIX}<pid>-<rand>-<n>.scope, one per task"
                ),
                "scope": self.unit,
                "oom_policy": "continue" if self.scopes.oom_policy else "systemd default (too old)",
            }
        )
        if self.scope_mode == "runner" and self.session.runner is not None:
            facts["cgroup_v2"] = self.session.details()
        return facts

    # ------------------------------------------------------------ life cycle

    def open(self) -> None:
        if self.scope_mode == "task":
            self.scopes.open()
            return
        at: Place | None = None  # this process already has a delegated runner: share it
        if Runner.active() is None:
            self._scope = SelfScope.acquire(self.target, self.slice, self.mount)
            at = Place(self.mount, self._scope.path, move_self=True)
        try:
            self.session.open(at)
        except BaseException:
            if self._scope is not None:
                self._scope.release()
                self._scope = None
            raise

    def close(self) -> None:
        scope, self._scope = self._scope, None
        try:
            self.session.close()
        finally:
            if scope is not None:
                scope.release()
            self.scopes.close()

    def sandbox(self, limits: Limits) -> Sandbox:
        if self.scope_mode == "runner":
            return self.session.sandbox(limits, "SystemdBackend")
        return self.scopes.sandbox(limits)
