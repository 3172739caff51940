"""``scope_mode="task"``: one transient scope per task, the limits as unit properties::

    <slice>/sandboxrun-<pid>-<rand>-<n>.scope   MemoryMax, MemorySwapMax=0, TasksMax,
    │                                           CPUQuotaPerSecUSec (cpu_quota: systemd
    │                                           writes cpu.max and enables the cpu controller),
    │                                           RuntimeMaxUSec (backstop), OOMPolicy=continue,
    │                                           Delegate=yes; counters are read here
    ├── (keeper)                                `cat` reading a pipe we hold, our child: PIDs=
    └── task                                    the worker and all it starts; cgroup.kill here

systemd removes a scope's cgroup the moment it is empty, so the keeper (placed by systemd
before the worker exists) keeps it until the manager has read ``memory.peak`` and
``memory.events``; then the keeper is killed and systemd collects the scope. The worker enters
``task`` itself when it may (root); else systemd places it (AttachProcessesToUnit) before the
go frame. Kill, collect and the counters are the cgroup v2 backend's ``TaskCgroup``.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import itertools
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from ..._errors import SandboxrunError
from ..._limits import Limits
from ..._reasons import KillReason
from .. import cgroupfs, hosts
from ..base import Sandbox, Usage
from ..cgroup_v2.counters import PEAK_SAMPLE_SECONDS, TaskCgroup, enforced, probe_files
from ..cgroup_v2.place import Place
from .bus import JOB_TIMEOUT, PREFIX, Bus, Target, log, reap_stale

#: RuntimeMaxUSec = wall-clock limit + this + 10 %: systemd's backstop behind the manager's own
#: deadline (the scope starts before the worker does, so it needs some slack).
RUNTIME_GRACE_SECONDS = 2.0
_task_numbers = itertools.count(1)


class Keeper:
    """A tiny child process that keeps a task scope populated until its counters are read.

    ``cat`` reading a pipe only we (and our forked workers) can write to: it ends when we kill
    it, or on its own once all of us are gone.
    """

    def __init__(self, program: str) -> None:
        read_end, self.fd = os.pipe()
        try:
            self.pid = os.posix_spawn(
                program,
                [program],
                {"PATH": "/usr/bin:/bin"},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, read_end, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
                setpgroup=0,  # no terminal signals (Ctrl-C) for it
            )
        except BaseException:
            os.close(self.fd)
            raise
        finally:
            os.close(read_end)
        # Never the OOM killer's victim (that would let the scope vanish); root only.
        try:
            Path(f"/proc/{self.pid}/oom_score_adj").write_text("-1000")
        except OSError as error:
            log.debug("keeper %s keeps its oom_score_adj (%s)", self.pid, error)

    def stop(self) -> None:
        if self.fd < 0:
            return
        log.debug("SIGKILL keeper %s", self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.fd = -1


def task_properties(
    limits: Limits,
    keeper_pid: int,
    slice_name: str,
    cpu_quota: float | None = None,
    oom_policy: bool = True,
) -> list[tuple[str, str, Any]]:
    """The unit properties of one task's scope: (name, D-Bus signature, value)."""
    properties: list[tuple[str, str, Any]] = [
        ("PIDs", "au", [keeper_pid]),
        ("Delegate", "b", True),
        ("Slice", "s", slice_name),
        ("Description", "s", f"sandboxrun task (runner pid {os.getpid()})"),
        ("CollectMode", "s", "inactive-or-failed"),
        ("KillSignal", "i", int(signal.SIGKILL)),  # if systemd stops it: everything inside is ours
    ]
    if oom_policy:
        # Keep the scope (and its counters) after an OOM kill; the manager ends the task.
        properties.append(("OOMPolicy", "s", "continue"))
    if limits.memory_bytes is not None:
        properties += [("MemoryMax", "t", limits.memory_bytes), ("MemorySwapMax", "t", 0)]
    if limits.max_processes is not None:
        properties.append(("TasksMax", "t", limits.max_processes + 1))  # + the keeper
    quota = limits.cpu_quota if limits.cpu_quota is not None else cpu_quota  # the task's first
    if quota is not None:
        properties.append(("CPUQuotaPerSecUSec", "t", round(quota * 1_000_000)))
    if limits.wall_time_seconds is not None:
        backstop = limits.wall_time_seconds * 1.1 + RUNTIME_GRACE_SECONDS
        properties.append(("RuntimeMaxUSec", "t", round(backstop * 1_000_000)))
    return properties


class TaskScopes:
    """The task scopes of one backend: the bus, what is live, what systemd must still drop."""

    def __init__(self, target: Target, mount: Path, slice_name: str, cpu_quota: float | None):
        self.target = target
        self.mount = mount
        self.slice = slice_name
        self.cpu_quota = cpu_quota
        self.bus: Bus | None = None
        self.live: dict[str, SystemdScopeSandbox] = {}  # task scopes not removed yet
        self.pending: set[str] = set()  # task scopes released, not yet seen gone
        self.oom_policy = True  # False once systemd refused OOMPolicy on a scope (too old)
        self.place = Place(mount, mount, move_self=True)
        self.files = probe_files(self.place, None)
        self._probed = False
        self._enter_verdict: bool | None = None
        self.keeper_program = shutil.which("cat", path="/usr/bin:/bin") or "/bin/cat"

    @property
    def kernel_enforced(self) -> frozenset[str]:
        # CPUQuotaPerSecUSec: systemd enables the cpu controller down to the scope itself.
        quota = {"cpu_quota"} if "cpu" in hosts.controllers(self.mount) else set()
        return enforced(self.files) | quota

    def open(self) -> None:
        bus = Bus(self.target)
        try:
            reap_stale(bus)
        except BaseException:
            bus.close()
            raise
        self.bus = bus

    def close(self) -> None:
        """Wait until systemd has dropped every task scope we made; reset failed ones."""
        bus, self.bus = self.bus, None
        if bus is None:
            return
        try:
            for sandbox in list(self.live.values()):  # the manager removes them; just in case
                try:
                    sandbox.remove()
                except Exception as error:
                    log.warning("cannot remove %s (%s): systemd stops it", sandbox.unit, error)
            pending, self.pending = self.pending, set()
            left = bus.wait_removed(pending, JOB_TIMEOUT)
            for unit, state in bus.units(f"{PREFIX}{os.getpid()}-*"):
                if unit in left or (unit in pending and state == "failed"):
                    bus.stop(unit)
                    bus.reset_failed(unit)
        finally:
            bus.close()

    def sandbox(self, limits: Limits) -> SystemdScopeSandbox:
        if self.bus is None:
            raise RuntimeError("SystemdBackend.sandbox() before open()")
        return SystemdScopeSandbox(self, limits)

    def start(self, unit: str, limits: Limits, keeper_pid: int) -> None:
        assert self.bus is not None
        properties = task_properties(
            limits, keeper_pid, self.slice, self.cpu_quota, self.oom_policy
        )
        try:
            self.bus.start_scope(unit, properties)
        except SandboxrunError as error:
            if not (self.oom_policy and "OOMPolicy" in str(error)):
                raise
            log.warning("systemd refuses OOMPolicy on scopes (%s): its default applies", error)
            self.oom_policy = False
            self.bus.start_scope(unit, [p for p in properties if p[0] != "OOMPolicy"])

    def attach(self, unit: str, pid: int) -> None:
        assert self.bus is not None
        self.bus.attach(unit, "/task", [pid])

    def files_for(self, scope: Path) -> dict[str, bool]:
        if not self._probed:  # the first scope shows what every task scope will have
            self.files = probe_files(self.place, scope)
            self._probed = True
        return self.files

    def may_enter(self, task: Path) -> bool:
        """May a worker (forked from us, so in our cgroup) move itself into ``task``?"""
        if self._enter_verdict is None:
            own = cgroupfs.v2_cgroup_of("self", self.mount)
            if os.geteuid() == 0:
                self._enter_verdict = True
            elif own is None:
                self._enter_verdict = False
            else:
                common = Path(os.path.commonpath([own, task]))
                self._enter_verdict = all(
                    os.access(path / "cgroup.procs", os.W_OK) for path in (common, task)
                )
        return self._enter_verdict


class SystemdScopeSandbox(Sandbox):
    """One task in its own transient scope."""

    def __init__(self, scopes: TaskScopes, limits: Limits) -> None:
        self.scopes = scopes
        self.unit = f"{cgroupfs.runner_dir_name()}-{next(_task_numbers)}.scope"
        self.removed = False
        self.keeper = Keeper(scopes.keeper_program)
        started = False
        try:
            scopes.start(self.unit, limits, self.keeper.pid)
            started = True
            path = cgroupfs.v2_cgroup_of(self.keeper.pid, scopes.mount)
            if path is None or path.name != self.unit:
                raise SandboxrunError(f"systemd started {self.unit}, but its keeper is in {path}")
            self.path = path
            self.task = path / "task"
            os.mkdir(self.task)
            log.debug("mkdir %s", self.task)
        except BaseException:
            self.keeper.stop()
            if started:
                scopes.pending.add(self.unit)
            raise
        scopes.live[self.unit] = self
        # The scope's own files, still there: the keeper holds it. Its counters cover the task
        # (the keeper charges nothing: it was spawned, and its pages charged, before it moved).
        self.cgroup = TaskCgroup(self.task, path, scopes.files_for(path))
        if self.cgroup.samples_peak:
            self.poll_interval_seconds = PEAK_SAMPLE_SECONDS
        # The worker moves itself when it may write to the common ancestor (root); else systemd
        # places it (the user manager asks the system manager when it may not either).
        self.parent_attach = not scopes.may_enter(self.task)

    def enter_files(self) -> tuple[str, ...]:
        return () if self.parent_attach else (str(self.task / "cgroup.procs"),)

    def attach(self, pid: int) -> None:
        if self.parent_attach:
            self.scopes.attach(self.unit, pid)

    def poll(self) -> KillReason | None:
        self.cgroup.sample()
        return None

    def kill(self) -> None:
        self.cgroup.kill()

    def cpu_time_seconds(self) -> float | None:
        return self.cgroup.cpu_time_seconds()  # the scope's cpu.stat: the keeper uses ~none

    def collect(self) -> Usage:
        return self.cgroup.collect()

    def remove(self) -> None:
        if self.removed:
            return
        self.cgroup.remove_members()
        # Now the scope is empty: systemd stops and collects it (close() waits for that).
        self.keeper.stop()
        self.scopes.live.pop(self.unit, None)
        self.scopes.pending.add(self.unit)
        self.removed = True
