"""The runner cgroup of this process, and killing and emptying a cgroup v2 directory.

Layout::

    <root>                        delegated to us; we write only its cgroup.subtree_control
                                  (and cgroup.procs, to move this process out and back)
    └── sandboxrun-<pid>-<rand>   runner: one per process, shared by its open backends
        ├── supervisor            only when <root> held this process: it moves here, because a
        │                         cgroup with controllers enabled for children holds no processes
        └── task-<n>              one per task (see counters.TaskCgroup)
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import os
import select
import threading
import time
import warnings
from pathlib import Path

from ..._errors import BackendUnavailable
from .. import cgroupfs, hosts
from .place import OPTIONAL, REQUIRED, Place, locate

log = cgroupfs.log
EMPTY_TIMEOUT = 5.0
_KILL_ROUNDS = 100


def wait_empty(path: Path, timeout: float) -> bool:
    """Wait for ``populated 0``; cgroup.events raises POLLPRI on every change, so no spinning."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(path / "cgroup.events", os.O_RDONLY)
    except OSError:
        return not cgroupfs.pids(path)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            text = os.pread(fd, 4096, 0).decode()
            if "populated 0" in text:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 0.05) * 1000)  # re-read anyway: a change may predate poll()
    finally:
        os.close(fd)


def kill_all(path: Path, has_kill_file: bool) -> None:
    """SIGKILL everything in ``path`` (and below), also what forks while being killed."""
    if has_kill_file:
        try:
            cgroupfs.write(path / "cgroup.kill", 1)  # atomic against concurrent forks
        except FileNotFoundError:
            log.debug("kill %s: already gone", path)
        return
    # Before 5.14: freeze so nothing can fork while we signal, kill, thaw so they can die.
    for _ in range(_KILL_ROUNDS):
        victims = cgroupfs.pids(path)
        if not victims:
            return
        frozen = _write_freeze(path, 1)
        cgroupfs.kill_pids(victims, path)
        if frozen:
            _write_freeze(path, 0)
        wait_empty(path, 0.05)


def _write_freeze(path: Path, value: int) -> bool:
    try:
        cgroupfs.write(path / "cgroup.freeze", value)
        return True
    except OSError as error:
        if value:  # without a freeze, a fork may race the kill: the loop takes more rounds
            log.debug("cannot freeze %s (%s): killing unfrozen", path, error)
        else:
            log.warning("cannot thaw %s (%s): its killed processes may linger", path, error)
        return False


class Runner:
    """The runner cgroup of this process, shared (reference counted) by all open backends."""

    _lock = threading.Lock()
    _current: Runner | None = None

    def __init__(self, place: Place) -> None:
        self.place = place
        self.pid = os.getpid()
        self.path = place.root / cgroupfs.runner_dir_name()
        self.supervisor: Path | None = None
        self.enabled_in_root: list[str] = []
        self.enabled_here: list[str] = []
        self.refs = 0

    @classmethod
    def active(cls) -> Runner | None:
        runner = cls._current
        # A forked child inherits the object but not the cgroup arrangement.
        return runner if runner is not None and runner.pid == os.getpid() else None

    @classmethod
    def active_place(cls) -> Place | None:
        runner = cls.active()
        return None if runner is None else runner.place

    @classmethod
    def acquire(cls, at: Place | None = None) -> Runner:
        """The active runner, else a new one at ``at`` (default: ``locate()``)."""
        with cls._lock:
            runner = cls.active()
            if runner is None:
                place = at or locate()  # fresh: a cached verdict may be stale by now
                if isinstance(place, str):
                    raise BackendUnavailable(f"backend 'cgroup_v2' cannot work here: {place}")
                runner = cls(place)
                runner._set_up()
                cls._current = runner
            runner.refs += 1
            return runner

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs > 0 or self.pid != os.getpid():
                return
            Runner._current = None
            self._tear_down()

    def _set_up(self) -> None:
        root = self.place.root
        cgroupfs.reap_stale(root)  # runners that were SIGKILLed: their tasks run unwatched
        os.mkdir(self.path)
        log.debug("mkdir %s (runner)", self.path)
        try:
            if self.place.move_self:
                self.supervisor = self.path / "supervisor"
                os.mkdir(self.supervisor)
                for pid in cgroupfs.pids(root):
                    cgroupfs.write(self.supervisor / "cgroup.procs", pid)
            self._enable_in_root(root)
            usable = hosts.controllers(self.path)
            names = [n for n in (*REQUIRED, *OPTIONAL) if n in usable]
            cgroupfs.write(self.path / "cgroup.subtree_control", " ".join(f"+{n}" for n in names))
            self.enabled_here = names
        except BaseException:
            self._tear_down()
            raise

    def _enable_in_root(self, root: Path) -> None:
        have = hosts.controllers(root, "cgroup.subtree_control")
        wanted = [name for name in REQUIRED if name not in have]
        if wanted:
            cgroupfs.write(root / "cgroup.subtree_control", " ".join(f"+{n}" for n in wanted))
            self.enabled_in_root += wanted
        for name in OPTIONAL:
            if name not in have and name in hosts.controllers(root):
                try:
                    cgroupfs.write(root / "cgroup.subtree_control", f"+{name}")
                    self.enabled_in_root.append(name)
                except OSError as error:  # cpu refuses while realtime threads are inside
                    log.warning(
                        "cannot enable the %s controller in %s (%s): no cpu_quota (cpu.max) "
                        "for tasks; cpu.stat keeps usage_usec, so the CPU-time limit holds",
                        name,
                        root,
                        error,
                    )

    def _tear_down(self) -> None:
        root = self.place.root
        for child in (p for p in self.path.glob("task-*") if p.is_dir()):
            kill_all(child, (child / "cgroup.kill").exists())
            wait_empty(child, EMPTY_TIMEOUT)
            try:
                cgroupfs.remove(child)
            except OSError as error:
                log.warning("task cgroup %s stays (%s); removing the runner fails", child, error)
        if any(p.is_dir() and p != self.path for p in root.iterdir()):
            # Other cgroups under <root> (maybe another runner's) may rely on the controllers we
            # enabled there, so they stay. Then we cannot go back into <root> either: stay in
            # supervisor; the runner dir is removed as stale by a later runner once we are gone.
            if self.supervisor is not None:
                log.info("%s stays (this process is in its supervisor) until a later runner", self)
                return
        else:
            self._restore_root(root)
        try:
            cgroupfs.remove_tree(self.path)
        except OSError as error:
            log.warning("could not remove %s (%s): a later runner reaps it", self.path, error)
            warnings.warn(
                f"sandboxrun: could not remove {self.path}: {error}", ResourceWarning, stacklevel=2
            )

    def _restore_root(self, root: Path) -> None:
        for path, names in ((self.path, self.enabled_here), (root, self.enabled_in_root)):
            if names:  # bottom-up: a controller a child still enables cannot be disabled
                try:
                    cgroupfs.write(
                        path / "cgroup.subtree_control", " ".join(f"-{n}" for n in names)
                    )
                except OSError as error:
                    log.warning("cannot disable %s in %s (%s): they stay on", names, path, error)
        # Now <root> enables no domain controller again, so it may hold processes.
        for pid in cgroupfs.pids(self.supervisor) if self.supervisor is not None else []:
            try:
                cgroupfs.write(root / "cgroup.procs", pid)
            except OSError as error:
                log.warning("cannot move pid %s back to %s (%s)", pid, root, error)

    def __repr__(self) -> str:
        return f"<runner {self.path}>"
