"""The cgroup v2 backend: one plain child cgroup per task, limits kept by the kernel.

File names are the kernel's (Documentation/admin-guide/cgroup-v2.rst). Where it lives:
``place.py``; the runner cgroup: ``runner.py``; a task's counters: ``counters.py``. Per task::

    <root>/sandboxrun-<pid>-<rand>/task-<n>    memory.max, memory.swap.max, memory.oom.group,
                                               pids.max, cpu.max (under cpu_quota); removed
                                               once its counters are read
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import itertools
import os
import platform
from collections.abc import Mapping
from pathlib import Path

from ..._errors import BackendUnavailable
from ..._limits import Limits
from ..._reasons import KillReason
from .. import cgroupfs, hosts
from ..base import Backend, Sandbox, Usage
from .counters import (
    KERNEL_ENFORCED,
    PEAK_SAMPLE_SECONDS,
    TaskCgroup,
    enforced,
    peak_source,
    probe_files,
    write_cpu_max,
)
from .place import ROOT_ENV, Place, locate
from .runner import Runner

log = cgroupfs.log
_task_numbers = itertools.count(1)


class CgroupV2Sandbox(Sandbox):
    def __init__(self, path: Path, limits: Limits, files: Mapping[str, bool]) -> None:
        self.path = path
        self.cgroup = TaskCgroup(path, path, files)
        self.removed = False
        if self.cgroup.samples_peak:
            # memory.peak needs 5.19: sample memory.current instead (it misses short spikes).
            self.poll_interval_seconds = PEAK_SAMPLE_SECONDS
        os.mkdir(path)
        log.debug("mkdir %s", path)
        try:
            memory = limits.memory_bytes
            cgroupfs.write(path / "memory.max", "max" if memory is None else memory)
            if memory is not None and files["memory.swap.max"]:
                cgroupfs.write(path / "memory.swap.max", 0)  # else the limit spills into swap
            if files["memory.oom.group"]:
                # Kill the whole task on OOM, not a random process of it we might not notice.
                cgroupfs.write(path / "memory.oom.group", 1)
            processes = limits.max_processes
            cgroupfs.write(path / "pids.max", "max" if processes is None else processes)
            if limits.cpu_quota is not None:
                write_cpu_max(path, limits.cpu_quota)
        except BaseException:
            cgroupfs.remove(path)
            raise

    def enter_files(self) -> tuple[str, ...]:
        # The worker writes 0 here itself before any task code: no round trip with the manager.
        return (str(self.path / "cgroup.procs"),)

    def poll(self) -> KillReason | None:
        self.cgroup.sample()
        return None  # the kernel enforces memory.max; this only tracks the peak

    def kill(self) -> None:
        self.cgroup.kill()

    def cpu_time_seconds(self) -> float | None:
        return self.cgroup.cpu_time_seconds()

    def collect(self) -> Usage:
        return self.cgroup.collect()

    def remove(self) -> None:
        if not self.removed:
            self.removed = self.cgroup.remove_members()  # else close() retries the runner tree


class RunnerSession:
    """The cgroup v2 runner as a part: open it at a place, make task cgroups below it, close it.

    ``CgroupV2Backend`` is one; the systemd backend's runner mode holds one whose place is the
    scope systemd delegated to it. Sessions of one process share the ``Runner``.
    """

    def __init__(self, place: Place) -> None:
        self.place = place
        self.runner: Runner | None = None
        self.files = probe_files(place, None)

    @property
    def path(self) -> Path | None:
        return None if self.runner is None else self.runner.path

    @property
    def kernel_enforced(self) -> frozenset[str]:
        return enforced(self.files)

    def open(self, at: Place | None = None) -> None:
        """``at``: where a new runner goes (default: located afresh); an active one is shared."""
        self.runner = Runner.acquire(at)
        self.place = self.runner.place
        self.files = probe_files(self.place, self.runner.path)

    def close(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.release()

    def sandbox(self, limits: Limits, owner: str) -> CgroupV2Sandbox:
        if self.runner is None:
            raise RuntimeError(f"{owner}.sandbox() before open()")
        if limits.cpu_quota is not None and not self.files.get("cpu.max"):
            raise RuntimeError(
                f"cpu_quota needs the cgroup v2 cpu controller in {self.runner.path}: enable it"
                f" in {self.place.root}/cgroup.subtree_control (it refuses while a realtime"
                " thread is inside)"
            )
        path = self.runner.path / f"task-{next(_task_numbers)}"
        return CgroupV2Sandbox(path, limits, self.files)

    def details(self) -> dict[str, object]:
        place, root = self.place, self.place.root
        return {
            "mount": str(place.mount),
            "root": str(root),
            "root_source": ROOT_ENV if os.environ.get(ROOT_ENV) else "own cgroup",
            "layout": (
                f"{root}/sandboxrun-<pid>-<rand>/"
                + ("{supervisor,task-<n>}" if place.move_self else "task-<n>")
            ),
            "runner": None if self.path is None else str(self.path),
            "moves_self_to_supervisor": place.move_self,
            "kernel": platform.release(),
            "files": dict(self.files),
            "peak_memory": peak_source(self.files),
            "controllers": sorted(hosts.controllers(root)),
            "subtree_control": sorted(hosts.controllers(root, "cgroup.subtree_control")),
        }


class CgroupV2Backend(Backend):
    name = "cgroup_v2"
    enforceable = KERNEL_ENFORCED

    _verdicts: dict[str | None, Place | str] = {}

    def __init__(self) -> None:
        place = locate(Runner.active_place())
        if isinstance(place, str):
            raise BackendUnavailable(f"backend 'cgroup_v2' cannot work here: {place}")
        self.session = RunnerSession(place)

    @property
    def kernel_enforced(self) -> frozenset[str]:
        return self.session.kernel_enforced  # without memory.peak (before 5.19): sampled

    @property
    def files(self) -> dict[str, bool]:
        return dict(self.session.files)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        key = os.environ.get(ROOT_ENV)
        if key not in cls._verdicts:
            cls._verdicts[key] = locate(Runner.active_place())
        verdict = cls._verdicts[key]
        return verdict if isinstance(verdict, str) else None

    def details(self) -> dict[str, object]:
        return self.session.details()

    @property
    def runner_path(self) -> Path | None:
        """The runner cgroup while open (tasks are ``task-<n>`` below it)."""
        return self.session.path

    @property
    def runner_dirs(self) -> list[Path]:
        """Every cgroup directory this backend made and removes at close (the runner)."""
        return [] if self.session.path is None else [self.session.path]

    def open(self) -> None:
        self.session.open()

    def close(self) -> None:
        self.session.close()

    def sandbox(self, limits: Limits) -> Sandbox:
        return self.session.sandbox(limits, "CgroupV2Backend")
