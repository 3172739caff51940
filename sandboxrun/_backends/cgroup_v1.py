"""cgroup v1 backend: one child cgroup per task in each v1 hierarchy the runner is in.

Read against Documentation/admin-guide/cgroup-v1/{memory,pids,freezer-subsystem,cpuacct}.rst
and scheduler/sched-design-CFS.rst (group scheduling).

Layout, per hierarchy (memory always; pids, freezer, cpu when mounted; cpuacct when mounted
and the task has a CPU-time limit or quota, or when it shares the cpu hierarchy's directory)::

    <mount>/<own cgroup>/sandboxrun-<pid>-<rand>/task-<n>

v1 has no no-internal-processes rule, so the runner stays where it is and only creates children
of its own cgroup. Limits and counters, all kernel-kept:

- ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes`` when swap accounting exists, so the
  limit cannot leak into swap); peak = ``memory.max_usage_in_bytes``; OOM kills = ``oom_kill`` in
  ``memory.oom_control`` (4.13+), which is also an eventfd source (``cgroup.event_control``): on
  an OOM event the whole task is killed, the v1 stand-in for v2's ``memory.oom.group=1``.
- ``pids.max`` for ``max_processes``.
- tree kill: freeze (``freezer.state`` = FROZEN, so nothing can fork), SIGKILL every pid, thaw.
- CPU time from ``cpuacct.usage`` (nanoseconds, the whole tree), read while the task runs
  under ``cpu_time_limit_seconds`` (``cpu_time_seconds()``). Without a limit or quota a separate
  cpuacct hierarchy costs a mkdir, an enter and an rmdir per task for a figure the worker's
  rusage (its own + its waited children) gives nearly as well, so it is left out then.
- ``cpu``: a task cgroup is one CFS scheduling entity, so a task running hundreds of busy
  processes gets one share of the CPU, not hundreds: the manager's timers stay on time while a
  fork bomb spins. Under ``cpu_quota``: ``cpu.cfs_period_us`` = 100000 and ``cpu.cfs_quota_us``
  = quota * period (sched-bwc.rst); throttling from ``cpu.stat`` ``nr_throttled`` and
  ``throttled_time`` (ns).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .._limits import CPU_PERIOD_USEC, Limits
from .._reasons import KillReason
from . import cgroupfs
from .base import Backend, Sandbox, Usage

if TYPE_CHECKING:
    from .cgroup_v1_slot import SlotSandbox

log = cgroupfs.log
_CONTROLLERS = ("memory", "pids", "freezer", "cpu", "cpuacct")
KERNEL_ENFORCED = frozenset(
    {"memory", "processes", "tree_kill", "peak_memory", "oom_detection", "cpu_time", "cpu_quota"}
)
_FREEZE_WAIT_SECONDS = 2.0
_EMPTY_WAIT_SECONDS = 5.0


def _hierarchies() -> dict[str, Path]:
    """{controller: the runner's own cgroup directory} for each mounted v1 controller we use."""
    own = cgroupfs.own_cgroups()
    found: dict[str, Path] = {}
    for fstype, point, options in cgroupfs.mounts():
        if fstype != "cgroup":
            continue
        for controller in _CONTROLLERS:
            if controller in options and controller not in found:
                key = next((k for k in own if controller in k.split(",")), None)
                if key is not None:
                    found[controller] = point / own[key].lstrip("/")
    return found


def parent_pid(pid: int) -> int | None:
    try:
        stat = cgroupfs.read_bytes(f"{cgroupfs.PROC}/{pid}/stat")
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[1])  # after "(comm)": state, then ppid


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"{cgroupfs.PROC}/{pid}/ns/pid")
    except OSError:
        return None


_own_namespace: tuple[int, str | None] | None = None


def _own_pid_namespace() -> str | None:
    """This process's PID namespace, read once per process (a fork reads its own): setns and
    unshare never move the caller itself to another PID namespace, only its later children."""
    global _own_namespace
    if _own_namespace is None or _own_namespace[0] != os.getpid():
        _own_namespace = (os.getpid(), _pid_namespace(os.getpid()))
    return _own_namespace[1]


def _probe(directory: Path) -> str | None:
    probe = directory / cgroupfs.runner_dir_name()
    try:
        probe.mkdir()
    except OSError as error:
        return f"cannot create a cgroup in {directory}: {error.strerror}"
    try:
        probe.rmdir()
    except OSError as error:
        log.warning("cannot remove the probe cgroup %s (%s): it stays", probe, error)
    return None


def _write_quota(cpu: Path, quota: float) -> None:
    """CFS bandwidth: ``quota`` CPUs = that share of every 100 ms period, summed over CPUs."""
    cgroupfs.write(cpu / "cpu.cfs_period_us", CPU_PERIOD_USEC)
    try:
        cgroupfs.write(cpu / "cpu.cfs_quota_us", round(quota * CPU_PERIOD_USEC))
    except OSError as error:
        # v1 refuses a child's quota above an ancestor's (EINVAL in tg_cfs_schedulable_down).
        raise OSError(
            error.errno,
            f"cannot set cpu_quota={quota} in {cpu} ({error.strerror}): an enclosing cgroup "
            "(the manager's own) may have a smaller CPU quota; ask for at most that much",
        ) from error


class CgroupV1Sandbox(Sandbox):
    def __init__(
        self,
        dirs: dict[str, Path],
        limits: Limits,
        running: set[str] | None = None,
        write_limits: bool = True,
    ) -> None:
        self.dirs = dirs
        self.limits = limits
        # PID namespaces of the backend's running tasks (shared by its sandboxes): a process in
        # one of them that left its cgroup still dies with its task's PID 1.
        self.running = set() if running is None else running
        self.namespace: str | None = None
        self.event_fd = None
        self._removed = False
        self._oom_base = 0  # oom_kill before the task (a reused slot's count goes on)
        self._files: dict[tuple[str, str], Path] = {}
        self.kept: cgroupfs.OpenFiles | None = None  # a reused slot's counter files, open
        # Co-mounted controllers (e.g. "cpu,cpuacct") share one directory.
        self.paths = list(dict.fromkeys(dirs.values()))
        created: list[Path] = []
        try:
            for path in self.paths:
                path.mkdir()
                log.debug("mkdir %s", path)
                created.append(path)
            memory = dirs["memory"]
            if write_limits and limits.memory_bytes is not None:
                cgroupfs.write(memory / "memory.limit_in_bytes", limits.memory_bytes)
                if (memory / "memory.memsw.limit_in_bytes").exists():
                    cgroupfs.write(memory / "memory.memsw.limit_in_bytes", limits.memory_bytes)
                self.event_fd = self._oom_eventfd(memory)
            if write_limits and limits.max_processes is not None and "pids" in dirs:
                cgroupfs.write(dirs["pids"] / "pids.max", limits.max_processes)
            if limits.cpu_quota is not None:
                _write_quota(dirs["cpu"], limits.cpu_quota)
        except BaseException:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    cgroupfs.remove(path)
            self._close_event_fd()
            raise

    @staticmethod
    def _oom_eventfd(memory: Path) -> int | None:
        if not hasattr(os, "eventfd"):
            return None
        event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        control = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            cgroupfs.write(memory / "cgroup.event_control", f"{event_fd} {control}")
        except OSError as error:
            log.warning(
                "no OOM eventfd for %s (%s): an OOM kills one victim, not the whole task "
                "(oom_kill in memory.oom_control still marks it out of memory)",
                memory,
                error,
            )
            os.close(event_fd)
            return None
        finally:
            # The kernel holds its own reference to the oom_control file once registered.
            os.close(control)
        return event_fd

    def file(self, controller: str, name: str) -> Path:
        """``dirs[controller] / name``, made once per sandbox (a slot reads the same few
        files for every task)."""
        path = self._files.get((controller, name))
        if path is None:
            path = self._files[controller, name] = self.dirs[controller] / name
        return path

    def _read_int(self, controller: str, name: str) -> int | None:
        return cgroupfs.read_int(self.file(controller, name), self.kept)

    def enter_files(self) -> tuple[str, ...]:
        return tuple(str(path / "cgroup.procs") for path in self.paths)

    def attach(self, pid: int) -> None:
        namespace = _pid_namespace(pid)
        if namespace is not None and namespace != _own_pid_namespace():
            self.namespace = namespace  # the zygote launcher's: a namespace of its own
            self.running.add(namespace)

    def cpu_time_seconds(self) -> float | None:
        usage = self._read_int("cpuacct", "cpuacct.usage") if "cpuacct" in self.dirs else None
        return None if usage is None else usage / 1e9

    def on_event(self) -> KillReason | None:
        if self.event_fd is None:
            return None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.event_fd)
        # The event fires when the cgroup hit its limit and reclaim failed (it also fires on
        # rmdir, but the manager stops listening before remove()). The kernel kills one victim;
        # killing the rest makes the task die as a whole, like memory.oom.group=1 on v2.
        return KillReason.MEMORY

    def _members(self) -> list[int]:
        """Every pid in the task's cgroups and in the sub-cgroups the task made there, in every
        hierarchy (a process may have moved to a sub-cgroup of one hierarchy only)."""
        return list(dict.fromkeys(pid for path in self.paths for pid in cgroupfs.tree_pids(path)))

    def kill(self) -> None:
        # v1 freezer.state is hierarchical (sub-cgroups freeze too); cgroup.procs is not, so
        # the pids are read from every directory below the task's.
        freezer = self.dirs.get("freezer")
        frozen = freezer is not None and self._freeze(freezer)
        try:
            # Without a freezer, forks can race the kill; loop until a pass finds nobody.
            for _ in range(1 if frozen else 1000):
                victims = self._members()
                if not victims:
                    break
                cgroupfs.kill_pids(victims, self.dirs["memory"])
        finally:
            if frozen and freezer is not None:
                cgroupfs.write(freezer / "freezer.state", "THAWED")
        self._kill_escaped()

    def _kill_escaped(self) -> None:
        # Nothing of ours ever runs in the runner's own directory (a worker goes from the
        # manager's cgroup straight into its task's): a process there moved itself out of a
        # task cgroup (cgroup.procs of the parent is writable by root). End it.
        # A worker (our own child) that escaped is left to its own deadline, which kills it by
        # pid and classifies it; so is a process in a running task's PID namespace (its PID 1's
        # kill takes it). Anything else is a task's orphan: nobody watches it.
        for path in self.paths:
            escaped = [pid for pid in cgroupfs.pids(path.parent) if not self._watched(pid)]
            if escaped:
                log.warning("pids %s escaped into the runner cgroup %s: killed", escaped,
                            path.parent)  # fmt: skip
                cgroupfs.kill_pids(escaped, path.parent)

    def _watched(self, pid: int) -> bool:
        return parent_pid(pid) == os.getpid() or (
            bool(self.running) and _pid_namespace(pid) in self.running
        )

    @staticmethod
    def _freeze(freezer: Path) -> bool:
        try:
            cgroupfs.write(freezer / "freezer.state", "FROZEN")
        except OSError as error:  # then forks may race the kill: kill() loops instead
            log.debug("cannot freeze %s (%s): killing unfrozen", freezer, error)
            return False
        deadline = time.monotonic() + _FREEZE_WAIT_SECONDS
        for attempt in itertools.count():
            if cgroupfs.read(freezer / "freezer.state") == "FROZEN":
                return True
            if time.monotonic() > deadline:
                return False  # still FREEZING: kill anyway, and loop
            time.sleep(0 if attempt < 10 else 0.001)
        return False

    def _wait_empty(self) -> None:
        deadline = time.monotonic() + _EMPTY_WAIT_SECONDS
        for attempt in itertools.count():
            if not self._members() or time.monotonic() > deadline:
                return
            if attempt % 50 == 49:
                self.kill()
            time.sleep(0.0005)

    def collect(self) -> Usage:
        if self._members():  # leftovers (grandchildren, in sub-cgroups too): end them
            self.kill()
            self._wait_empty()
        else:
            self._kill_escaped()
        oom = cgroupfs.read_keyed(self.file("memory", "memory.oom_control"), self.kept)
        # Read only under a quota: without one a task cgroup is never throttled.
        throttle = (
            cgroupfs.read_keyed(self.file("cpu", "cpu.stat"), self.kept)
            if self.limits.cpu_quota is not None
            else {}
        )
        throttled_ns = throttle.get("throttled_time")
        return Usage(
            peak_memory_bytes=self._read_int("memory", "memory.max_usage_in_bytes"),
            oom_killed=oom.get("oom_kill", 0) > self._oom_base,
            memory_limit_hit=(self._read_int("memory", "memory.failcnt") or 0) > 0,
            process_limit_hit=self._forks_refused(),
            cpu_time_seconds=self.cpu_time_seconds(),
            cpu_throttled_periods=throttle.get("nr_throttled"),
            cpu_throttled_seconds=None if throttled_ns is None else throttled_ns / 1e9,
        )

    def _forks_refused(self) -> bool:
        if "pids" not in self.dirs or self.limits.max_processes is None:
            return False  # no pids.max of ours: nothing to read
        return cgroupfs.read_keyed(self.file("pids", "pids.events"), self.kept).get("max", 0) > 0

    def _close_event_fd(self) -> None:
        if self.event_fd is not None:
            with contextlib.suppress(OSError):  # already closed: nothing is left to release
                os.close(self.event_fd)
            self.event_fd = None

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        self.running.discard(self.namespace or "")
        self._close_event_fd()
        # Sub-cgroups the task made go first (remove_tree is deepest first). What still says
        # EBUSY is retried later (cgroupfs.LEFTOVERS): one task's cgroup never fails the batch.
        for path in self.paths:
            cgroupfs.remove_or_defer(path, attempts=50)


class CgroupV1Backend(Backend):
    name = "cgroup_v1"
    enforceable = KERNEL_ENFORCED

    _reason_cache: str | bool | None = False

    def __init__(self) -> None:
        self.own = _hierarchies()
        self.runner: dict[str, Path] = {}
        self._counter = itertools.count(1)
        self._running: set[str] = set()
        self._slots: list[SlotSandbox] = []  # every slot made (born-in-place layout)
        self._free_slots: list[SlotSandbox] = []

    @property
    def kernel_enforced(self) -> frozenset[str]:
        """Without a pids hierarchy no process limit, without cpuacct no CPU time, without cpu
        no quota."""
        missing = {"processes": "pids", "cpu_time": "cpuacct", "cpu_quota": "cpu"}
        return frozenset(k for k in KERNEL_ENFORCED if missing.get(k, "memory") in self.own)

    @property
    def runner_dirs(self) -> list[Path]:
        """Every cgroup directory this backend made and removes at close (one per hierarchy)."""
        return list(dict.fromkeys(self.runner.values()))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls._reason_cache is not False:
            return cls._reason_cache  # type: ignore[return-value]
        own = _hierarchies()
        if "memory" not in own:
            reason: str | None = "no cgroup v1 memory hierarchy is mounted"
        else:
            reason = _probe(own["memory"])
        cls._reason_cache = reason
        return reason

    def details(self) -> dict[str, object]:
        memory = self.own.get("memory")
        return {
            "hierarchies": {name: str(path) for name, path in self.own.items()},
            "swap_accounting": bool(memory and (memory / "memory.memsw.limit_in_bytes").exists()),
            "tree_kill": "freezer" if "freezer" in self.own else "kill loop (no freezer)",
            "process_limit": "pids.max"
            if "pids" in self.own
            else "unavailable (no pids hierarchy)",
            "cpu_quota": "cpu.cfs_quota_us"
            if "cpu" in self.own
            else "unavailable (no cpu hierarchy)",
        }

    def open(self) -> None:
        name = cgroupfs.runner_dir_name()
        try:
            for controller, own in self.own.items():
                runner = own / name
                if runner not in self.runner.values():
                    cgroupfs.LEFTOVERS.retry(force=True)
                    cgroupfs.reap_stale(own)
                    runner.mkdir()
                    log.debug("mkdir %s (runner)", runner)
                self.runner[controller] = runner
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for slot in self._slots:  # their zygotes are gone: the launcher closed first
            slot.destroy()
        self._slots.clear()
        self._free_slots.clear()
        cgroupfs.LEFTOVERS.retry(force=True)
        for runner in dict.fromkeys(self.runner.values()):
            cgroupfs.remove_or_defer(runner)  # else a later runner reaps it (reap_stale)
        self.runner.clear()

    def sandbox(self, limits: Limits) -> Sandbox:
        if limits.max_processes is not None and "pids" not in self.runner:
            raise RuntimeError("max_processes needs the cgroup v1 pids hierarchy, not mounted here")
        cgroupfs.LEFTOVERS.retry()  # only the ones whose back-off is over: a few rmdirs at most
        if limits.cpu_quota is not None and "cpu" not in self.runner:
            raise RuntimeError("cpu_quota needs the cgroup v1 cpu hierarchy, not mounted here")
        name = f"task-{next(self._counter)}"
        dirs = {c: runner / name for c, runner in self.runner.items() if self._wanted(c, limits)}
        return CgroupV1Sandbox(dirs, limits, self._running)

    def _wanted(self, controller: str, limits: Limits) -> bool:
        if controller != "cpuacct" or self.runner["cpuacct"] == self.runner.get("cpu"):
            return True  # co-mounted with cpu ("cpu,cpuacct"): one directory, no extra cost
        return limits.cpu_time_seconds is not None or limits.cpu_quota is not None

    def slot_sandbox(self, limits: Limits) -> Sandbox:
        """A reused per-slot cgroup for a task born inside it (see ``cgroup_v1_slot``)."""
        if limits.max_processes is not None and "pids" not in self.runner:
            raise RuntimeError("max_processes needs the cgroup v1 pids hierarchy, not mounted here")
        if limits.cpu_quota is not None and "cpu" not in self.runner:
            raise RuntimeError("cpu_quota needs the cgroup v1 cpu hierarchy, not mounted here")
        from .cgroup_v1_slot import SlotSandbox  # it subclasses CgroupV1Sandbox

        if self._free_slots:
            return self._free_slots.pop().begin(limits)
        name = f"slot-{next(self._counter)}"
        dirs = {c: r / name for c, r in self.runner.items() if c != "freezer"}
        slot = SlotSandbox(dirs, limits, self._running, self._free_slots)
        self._slots.append(slot)
        return slot.begin(limits)
