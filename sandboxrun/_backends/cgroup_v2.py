"""The cgroup v2 backend: one plain child cgroup per task, limits kept by the kernel.

File names are the kernel's (Documentation/admin-guide/cgroup-v2.rst). Layout::

    <root>                        delegated to us; we write only its cgroup.subtree_control
                                  (and cgroup.procs, to move this process out and back)
    └── sandboxrun-<pid>-<rand>   runner: one per process, shared by its open backends
        ├── supervisor            only when <root> held this process: it moves here, because a
        │                         cgroup with controllers enabled for children holds no processes
        └── task-<n>              one per task: memory.max, memory.swap.max, memory.oom.group,
                                  pids.max; removed once its counters are read

``<root>`` is ``$SANDBOXRUN_CGROUP_ROOT`` (a delegated cgroup, e.g. a systemd unit with
``Delegate=yes``) or else this process's own cgroup. Nothing above ``<root>`` is ever written.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import select
import signal
import threading
import time
import warnings
from pathlib import Path

from .._errors import BackendUnavailable
from .._limits import Limits
from . import cgroupfs
from .base import Backend, Sandbox, Usage

ROOT_ENV = "SANDBOXRUN_CGROUP_ROOT"
REQUIRED = ("memory", "pids")
OPTIONAL = ("cpu",)  # for cpu.stat's user/system split and a later cpu.max; never required
PROBED_FILES = ("memory.peak", "cgroup.kill", "memory.oom.group", "memory.swap.max")
_EMPTY_TIMEOUT = 5.0
_KILL_ROUNDS = 100
_PEAK_SAMPLE_SECONDS = 0.05

_task_numbers = itertools.count(1)


def _controllers(path: Path, name: str) -> set[str]:
    try:
        return set(cgroupfs.read(path / name).split())
    except OSError:
        return set()


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _is_ours(pid: int) -> bool:
    """This process or one of its descendants (e.g. a forkserver it started)."""
    me, seen = os.getpid(), 0
    while pid > 1 and seen < 64:
        if pid == me:
            return True
        pid, seen = _parent_pid(pid) or 0, seen + 1
    return False


def _undelegated_unit(mount: Path, path: Path) -> Path | None:
    """The systemd unit cgroup holding ``path`` when systemd did not delegate it to us, else None.

    systemd marks the cgroup of a unit with ``Delegate=yes`` with the xattr ``trusted.delegate``
    (``user.delegate`` too since v251). Cgroups made below a unit without it fight systemd
    (docs/CGROUP_DELEGATION.md). Only judged as root: unprivileged, such a cgroup is not writable
    anyway, or it belongs to the user's own manager, which may not mark delegation.
    """
    if os.geteuid() != 0 or not os.path.isdir("/run/systemd/system"):  # sd_booted()
        return None
    probe = path
    while probe != mount and mount in probe.parents:
        if probe.name.endswith((".service", ".scope")):
            for name in ("trusted.delegate", "user.delegate"):
                with contextlib.suppress(OSError):
                    if os.getxattr(probe, name) == b"1":
                        return None
            return probe
        probe = probe.parent
    return None


def _wait_empty(path: Path, timeout: float) -> bool:
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


def _kill_all(path: Path, has_kill_file: bool) -> None:
    if has_kill_file:
        with contextlib.suppress(FileNotFoundError):
            cgroupfs.write(path / "cgroup.kill", 1)  # atomic against concurrent forks
        return
    # Before 5.14: freeze so nothing can fork while we signal, kill, thaw so they can die.
    for _ in range(_KILL_ROUNDS):
        pids = cgroupfs.pids(path)
        if not pids:
            return
        with contextlib.suppress(OSError):
            cgroupfs.write(path / "cgroup.freeze", 1)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            cgroupfs.write(path / "cgroup.freeze", 0)
        _wait_empty(path, 0.05)


class _Place:
    """Where the backend would live: the cgroup2 mount, the root, and what open() must do."""

    def __init__(self, mount: Path, root: Path, move_self: bool) -> None:
        self.mount = mount
        self.root = root
        self.move_self = move_self  # root holds this process: leave it for runner/supervisor


def _locate() -> _Place | str:
    """A usable place, or a sentence saying why there is none. Only reads."""
    v2 = [point for fstype, point, _ in cgroupfs.mounts() if fstype == "cgroup2"]
    if not v2:
        return "no cgroup2 filesystem is mounted"
    mount = v2[0]
    own = cgroupfs.own_cgroups().get("")
    if own is None:
        return "this process is in no cgroup v2 hierarchy (/proc/self/cgroup has no 0:: line)"
    missing = [name for name in REQUIRED if name not in _controllers(mount, "cgroup.controllers")]
    if missing:
        v1 = {c for fstype, _, options in cgroupfs.mounts() if fstype == "cgroup" for c in options}
        why = f" (hybrid host: cgroup v1 holds {'it' if len(missing) == 1 else 'them'})"
        why = why if set(missing) & v1 else ""
        return f"cgroup2 at {mount} has no {' or '.join(missing)} controller{why}"
    own_path = mount / own.lstrip("/")
    if not (own_path / "cgroup.procs").is_file():
        return f"own cgroup {own} is not visible under {mount} (another cgroup namespace?)"

    active = _Runner.active()
    configured = os.environ.get(ROOT_ENV)
    if configured:
        root = Path(configured)
        if not root.is_absolute():
            return f"{ROOT_ENV}={configured} is not an absolute path"
        if mount not in root.parents and root != mount:  # also accept a path inside the hierarchy
            root = mount / configured.lstrip("/")
        if not (root / "cgroup.procs").is_file():
            return f"{ROOT_ENV}={configured} is not a cgroup under {mount}"
    elif active is not None:
        root = active.place.root  # we moved ourselves below it: it is still our root
    else:
        root = own_path
    if active is not None and active.place.root == root:
        return active.place

    which = f"{ROOT_ENV} cgroup {root}" if configured else f"own cgroup {root}"
    unit = None if configured else _undelegated_unit(mount, root)
    if unit is not None:
        return (
            f"{which} belongs to systemd unit {unit.name}, which is not delegated (no "
            "Delegate=yes): use backend 'systemd', run under `systemd-run -p Delegate=yes`, or "
            f"set {ROOT_ENV} to a delegated cgroup"
        )
    missing = [name for name in REQUIRED if name not in _controllers(root, "cgroup.controllers")]
    if missing:
        return (
            f"{which} lacks the {' and '.join(missing)} controller: its parent does not delegate "
            f"it ({root.parent}/cgroup.subtree_control)"
        )
    if _read_type(root) not in ("domain", None):
        return f"{which} is a {_read_type(root)} cgroup, not a domain one"
    if not os.access(root, os.W_OK):
        return f"{which} is not writable"

    move_self = False
    enabled = _controllers(root, "cgroup.subtree_control")
    if not set(REQUIRED) <= enabled:
        if not os.access(root / "cgroup.subtree_control", os.W_OK):
            return f"{which} is not writable (cgroup.subtree_control)"
        procs = cgroupfs.pids(root) if root != mount else []
        others = [pid for pid in procs if not _is_ours(pid)]
        if others:
            return (
                f"{which} holds other processes ({', '.join(map(str, others[:5]))}): run under "
                "`systemd-run --scope -p Delegate=yes` or set "
                f"{ROOT_ENV} to a delegated cgroup"
            )
        if procs:
            if not os.access(root / "cgroup.procs", os.W_OK):
                return f"{which} is not writable (cgroup.procs)"
            move_self = True
    # Moving a worker in needs write access to cgroup.procs of the common ancestor.
    common = Path(os.path.commonpath([own_path, root]))
    if not os.access(common / "cgroup.procs", os.W_OK):
        return (
            f"workers cannot be moved from {own_path} into {root}: {common}/cgroup.procs is not "
            f"writable; set {ROOT_ENV} to a delegated cgroup that contains this process"
        )
    return _Place(mount, root, move_self)


def _read_type(path: Path) -> str | None:
    try:
        return cgroupfs.read(path / "cgroup.type")
    except OSError:
        return None  # the root cgroup has no cgroup.type


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _probe_files(place: _Place, runner: Path | None) -> dict[str, bool]:
    """Which optional kernel files a task cgroup will have."""
    for probe in (runner, place.root):
        # A non-root cgroup shows memory.* files iff its parent enables memory for it.
        if probe is not None and probe != place.mount and (probe / "memory.max").is_file():
            return {name: (probe / name).is_file() for name in PROBED_FILES}
    # Nothing to look at before open(): go by the version each file appeared in.
    return {
        "memory.peak": _kernel_at_least(5, 19),
        "cgroup.kill": _kernel_at_least(5, 14),
        "memory.oom.group": _kernel_at_least(4, 19),
        "memory.swap.max": (place.root / "memory.swap.max").is_file() or _kernel_at_least(4, 18),
    }


class _Runner:
    """The runner cgroup of this process, shared (reference counted) by all open backends."""

    _lock = threading.Lock()
    _current: _Runner | None = None

    def __init__(self, place: _Place) -> None:
        self.place = place
        self.pid = os.getpid()
        self.path = place.root / cgroupfs.runner_dir_name()
        self.supervisor: Path | None = None
        self.enabled_in_root: list[str] = []
        self.enabled_here: list[str] = []
        self.refs = 0

    @classmethod
    def active(cls) -> _Runner | None:
        runner = cls._current
        # A forked child inherits the object but not the cgroup arrangement.
        return runner if runner is not None and runner.pid == os.getpid() else None

    @classmethod
    def acquire(cls, at: _Place | None = None) -> _Runner:
        """The active runner, else a new one at ``at`` (default: ``_locate()``)."""
        with cls._lock:
            runner = cls.active()
            if runner is None:
                place = at or _locate()  # fresh: the cached verdict may be stale by now
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
            _Runner._current = None
            self._tear_down()

    def _set_up(self) -> None:
        root = self.place.root
        cgroupfs.reap_stale(root)  # runners that were SIGKILLed: their tasks run unwatched
        os.mkdir(self.path)
        try:
            if self.place.move_self:
                self.supervisor = self.path / "supervisor"
                os.mkdir(self.supervisor)
                for pid in cgroupfs.pids(root):
                    cgroupfs.write(self.supervisor / "cgroup.procs", pid)
            have = _controllers(root, "cgroup.subtree_control")
            wanted = [name for name in REQUIRED if name not in have]
            if wanted:
                cgroupfs.write(root / "cgroup.subtree_control", " ".join(f"+{n}" for n in wanted))
                self.enabled_in_root += wanted
            for name in OPTIONAL:
                if name not in have and name in _controllers(root, "cgroup.controllers"):
                    # Optional: cpu refuses to be enabled while realtime threads are inside.
                    with contextlib.suppress(OSError):
                        cgroupfs.write(root / "cgroup.subtree_control", f"+{name}")
                        self.enabled_in_root.append(name)
            usable = _controllers(self.path, "cgroup.controllers")
            names = [n for n in (*REQUIRED, *OPTIONAL) if n in usable]
            cgroupfs.write(self.path / "cgroup.subtree_control", " ".join(f"+{n}" for n in names))
            self.enabled_here = names
        except BaseException:
            self._tear_down()
            raise

    def _tear_down(self) -> None:
        root = self.place.root
        for child in (p for p in self.path.glob("task-*") if p.is_dir()):
            _kill_all(child, (child / "cgroup.kill").exists())
            _wait_empty(child, _EMPTY_TIMEOUT)
            with contextlib.suppress(OSError):
                cgroupfs.remove(child)
        if any(p.is_dir() and p != self.path for p in root.iterdir()):
            # Other cgroups under <root> (maybe another runner's) may rely on the controllers we
            # enabled there, so they stay. Then we cannot go back into <root> either: stay in
            # supervisor; the runner dir is removed as stale by a later runner once we are gone.
            if self.supervisor is not None:
                return
        else:
            for path, names in ((self.path, self.enabled_here), (root, self.enabled_in_root)):
                if names:  # bottom-up: a controller a child still enables cannot be disabled
                    with contextlib.suppress(OSError):
                        cgroupfs.write(
                            path / "cgroup.subtree_control", " ".join(f"-{n}" for n in names)
                        )
            # Now <root> enables no domain controller again, so it may hold processes.
            for pid in cgroupfs.pids(self.supervisor) if self.supervisor is not None else []:
                with contextlib.suppress(OSError):
                    cgroupfs.write(root / "cgroup.procs", pid)
        try:
            cgroupfs.remove_tree(self.path)
        except OSError as error:
            warnings.warn(
                f"sandboxrun: could not remove {self.path}: {error}", ResourceWarning, stacklevel=2
            )


class CgroupV2Sandbox(Sandbox):
    def __init__(self, path: Path, limits: Limits, files: dict[str, bool]) -> None:
        self.path = path
        self.files = files
        self.removed = False
        self.peak_sampled = 0
        if not files["memory.peak"]:
            # memory.peak needs 5.19: sample memory.current instead (it misses short spikes).
            self.poll_interval_seconds = _PEAK_SAMPLE_SECONDS
        os.mkdir(path)
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
        except BaseException:
            cgroupfs.remove(path)
            raise

    def enter_files(self) -> tuple[str, ...]:
        # The worker writes 0 here itself before any task code: no round trip with the manager.
        return (str(self.path / "cgroup.procs"),)

    def poll(self) -> str | None:
        current = cgroupfs.read_int(self.path / "memory.current")
        self.peak_sampled = max(self.peak_sampled, current or 0)
        return None  # the kernel enforces memory.max; this only tracks the peak

    def kill(self) -> None:
        _kill_all(self.path, self.files["cgroup.kill"])

    def collect(self) -> Usage:
        if cgroupfs.pids(self.path):
            self.kill()
        _wait_empty(self.path, _EMPTY_TIMEOUT)
        if self.files["memory.peak"]:
            peak = cgroupfs.read_int(self.path / "memory.peak")
        else:
            self.poll()
            peak = self.peak_sampled
        events = cgroupfs.read_keyed(self.path / "memory.events")
        cpu = cgroupfs.read_keyed(self.path / "cpu.stat").get("usage_usec")
        return Usage(
            peak_memory_bytes=peak,
            # A fresh cgroup per task, so plain counts (no deltas); oom_kill may count 2 for one
            # OOM under memory.oom.group (the victim, then the group kill).
            oom_killed=events.get("oom_kill", 0) > 0 or events.get("oom_group_kill", 0) > 0,
            memory_limit_hit=events.get("max", 0) > 0 or events.get("oom", 0) > 0,
            process_limit_hit=cgroupfs.read_keyed(self.path / "pids.events").get("max", 0) > 0,
            cpu_time_seconds=None if cpu is None else cpu / 1e6,
        )

    def remove(self) -> None:
        if self.removed:
            return
        try:
            cgroupfs.remove(self.path)
        except OSError:
            # Still populated (e.g. a process stuck in D state): kill again, try once more,
            # else leave it to close(), which retries the whole runner tree.
            _kill_all(self.path, self.files["cgroup.kill"])
            if not _wait_empty(self.path, _EMPTY_TIMEOUT):
                return
            with contextlib.suppress(OSError):
                cgroupfs.remove(self.path)
        self.removed = True


class CgroupV2Backend(Backend):
    name = "cgroup_v2"
    kernel_enforced = frozenset(
        {"memory", "processes", "tree_kill", "peak_memory", "oom_detection"}
    )

    _verdicts: dict[str | None, _Place | str] = {}

    def __init__(self) -> None:
        place = _locate()
        if isinstance(place, str):
            raise BackendUnavailable(f"backend 'cgroup_v2' cannot work here: {place}")
        self.place = place
        self._runner: _Runner | None = None
        self.files = _probe_files(place, None)
        self._set_enforced()

    def _set_enforced(self) -> None:
        enforced = set(CgroupV2Backend.kernel_enforced)
        if not self.files["memory.peak"]:
            enforced.discard("peak_memory")
        self.kernel_enforced = frozenset(enforced)  # type: ignore[misc]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        key = os.environ.get(ROOT_ENV)
        if key not in cls._verdicts:
            cls._verdicts[key] = _locate()
        verdict = cls._verdicts[key]
        return verdict if isinstance(verdict, str) else None

    def details(self) -> dict[str, object]:
        place = self._runner.place if self._runner is not None else self.place
        root = place.root
        return {
            "mount": str(place.mount),
            "root": str(root),
            "root_source": ROOT_ENV if os.environ.get(ROOT_ENV) else "own cgroup",
            "layout": (
                f"{root}/sandboxrun-<pid>-<rand>/"
                + ("{supervisor,task-<n>}" if place.move_self else "task-<n>")
            ),
            "runner": None if self._runner is None else str(self._runner.path),
            "moves_self_to_supervisor": place.move_self,
            "kernel": platform.release(),
            "files": dict(self.files),
            "peak_memory": (
                "memory.peak"
                if self.files["memory.peak"]
                else f"memory.current every {_PEAK_SAMPLE_SECONDS}s (degraded: no memory.peak)"
            ),
            "controllers": sorted(_controllers(root, "cgroup.controllers")),
            "subtree_control": sorted(_controllers(root, "cgroup.subtree_control")),
        }

    @property
    def runner_path(self) -> Path | None:
        """The runner cgroup while open (tasks are ``task-<n>`` below it)."""
        return None if self._runner is None else self._runner.path

    def open(self) -> None:
        self._runner = _Runner.acquire()
        self.place = self._runner.place
        self.files = _probe_files(self.place, self._runner.path)
        self._set_enforced()

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.release()

    def sandbox(self, limits: Limits) -> Sandbox:
        if self._runner is None:
            raise RuntimeError("CgroupV2Backend.sandbox() before open()")
        path = self._runner.path / f"task-{next(_task_numbers)}"
        return CgroupV2Sandbox(path, limits, self.files)
