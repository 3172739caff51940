"""``scope_mode="runner"``: this process's own delegated scope, shared by its open backends::

    <slice>/sandboxrun-<pid>-<rand>.scope   Delegate=yes, PIDs=[this process], once per process
    └── sandboxrun-<pid>-<rand>             the cgroup v2 runner (a RunnerSession at this place)
        ├── supervisor                      this process (the scope may not hold it: it enables
        └── task-<n>                        controllers for its children)

The last release moves this process back to where it came from, if it may write there (then
the empty scope goes away); else the process stays in its scope (reused by the next acquire)
and systemd removes it at exit.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import os
import threading
from pathlib import Path

from ..._errors import BackendUnavailable
from .. import cgroupfs
from .bus import JOB_TIMEOUT, Bus, Target, log, reap_stale


class SelfScope:
    """This process's own delegated scope (runner mode), reference counted."""

    _lock = threading.Lock()
    _current: SelfScope | None = None

    def __init__(self, unit: str, path: Path, origin: Path | None, target: Target) -> None:
        self.unit = unit
        self.path = path
        self.origin = origin  # where this process was before; it goes back there if it may
        self.target = target
        self.pid = os.getpid()
        self.refs = 0

    @classmethod
    def acquire(cls, target: Target, slice_name: str, mount: Path) -> SelfScope:
        with cls._lock:
            scope = cls._current
            if scope is None or scope.pid != os.getpid() or not scope.path.is_dir():
                scope = cls._create(target, slice_name, mount)
                cls._current = scope
            scope.refs += 1
            return scope

    @classmethod
    def _create(cls, target: Target, slice_name: str, mount: Path) -> SelfScope:
        pid = os.getpid()
        unit = f"{cgroupfs.runner_dir_name()}.scope"
        origin = cgroupfs.v2_cgroup_of("self", mount)
        with Bus(target) as bus:
            reap_stale(bus)
            bus.start_scope(
                unit,
                [
                    ("PIDs", "au", [pid]),
                    ("Delegate", "b", True),
                    ("Slice", "s", slice_name),
                    ("Description", "s", f"sandboxrun runner (pid {pid})"),
                    ("CollectMode", "s", "inactive-or-failed"),
                ],
            )
        path = cgroupfs.v2_cgroup_of("self", mount)
        if path is None or path.name != unit:
            raise BackendUnavailable(
                f"backend 'systemd': systemd started {unit} but this process is in {path}"
            )
        return cls(unit, path, origin, target)

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs > 0 or self.pid != os.getpid():
                return
            if self._leave():
                SelfScope._current = None
            # else: we stay in the scope (reused by the next acquire); it ends with the process

    def _leave(self) -> bool:
        """Move back to the original cgroup and wait until systemd has dropped the empty scope."""
        origin = self.origin
        if origin is None or not os.access(origin / "cgroup.procs", os.W_OK):
            log.debug("staying in %s: may not write %s", self.unit, origin)
            return False  # e.g. a root-owned login session: we may not go back
        with Bus(self.target) as bus:  # subscribed before the scope empties
            try:
                for pid in cgroupfs.pids(self.path):
                    cgroupfs.write(origin / "cgroup.procs", pid)
            except OSError as error:  # gone (an empty transient scope), or now an inner cgroup
                log.warning("cannot move back to %s (%s): staying in %s", origin, error, self.unit)
                return False
            if bus.wait_removed({self.unit}, JOB_TIMEOUT):
                bus.stop(self.unit)
            bus.reset_failed(self.unit)
        return True
