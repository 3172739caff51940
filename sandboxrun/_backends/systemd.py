"""The systemd backend: transient scopes through pystemd, so no manual delegation is needed.

For hosts where systemd is PID 1 but nothing delegates a cgroup to this process (a plain
service, a login session, a cron job): systemd itself hands out a delegated cgroup. The bus is
the system manager's as root, else the user's own manager (``--user``). ``pystemd`` is the
optional extra ``[systemd]``; without it this backend reports itself unavailable.

``scope_mode="runner"`` (the default; env ``SANDBOXRUN_SYSTEMD_SCOPE_MODE``)::

    <slice>/sandboxrun-<pid>-<rand>.scope   Delegate=yes, PIDs=[this process], once per process
    └── sandboxrun-<pid>-<rand>             the cgroup v2 backend's runner, unchanged:
        ├── supervisor                      this process (the scope may not hold it: it enables
        └── task-<n>                        controllers for its children)

    The per-task work is exactly the cgroup v2 backend's. The last close() moves this process
    back to where it came from, if it may write there (then the empty scope goes away); else the
    process stays in its scope (reused by the next open()) and systemd removes it at exit.

``scope_mode="task"``: one transient scope per task, the limits as unit properties::

    <slice>/sandboxrun-<pid>-<rand>-<n>.scope   MemoryMax, MemorySwapMax=0, TasksMax, CPUQuota,
    │                                           RuntimeMaxUSec (backstop), OOMPolicy=continue,
    │                                           Delegate=yes; counters are read here
    ├── (keeper)                                `cat` reading a pipe we hold, our child: PIDs=
    └── task                                    the worker and all it starts; cgroup.kill here

    systemd removes a scope's cgroup the moment it is empty, so the keeper (placed by systemd
    before the worker exists) keeps it until the manager has read ``memory.peak`` and
    ``memory.events``; then the keeper is killed and systemd collects the scope. The worker
    enters ``task`` itself when it may (root); else systemd places it (AttachProcessesToUnit)
    before the go frame.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxrunError
from .._limits import Limits
from . import cgroupfs
from .base import Sandbox, Usage
from .cgroup_v2 import (
    _EMPTY_TIMEOUT,
    _PEAK_SAMPLE_SECONDS,
    REQUIRED,
    CgroupV2Backend,
    _controllers,
    _kill_all,
    _Place,
    _probe_files,
    _Runner,
    _wait_empty,
)

SLICE_ENV = "SANDBOXRUN_SYSTEMD_SLICE"
MODE_ENV = "SANDBOXRUN_SYSTEMD_SCOPE_MODE"
DEFAULT_SLICE = "sandboxrun.slice"
MODES = ("runner", "task")
INSTALL_HINT = "pip install 'sandboxrun[systemd]' (needs libsystemd-dev, pkg-config, gcc)"
#: How long systemd may take to start or remove a unit (PID 1 may be busy; TCG guests are slow).
JOB_TIMEOUT = 60.0
#: RuntimeMaxUSec = wall-clock limit + this + 10 %: systemd's backstop behind the manager's own
#: deadline (the scope starts before the worker does, so it needs some slack).
RUNTIME_GRACE_SECONDS = 2.0

_DEST = b"org.freedesktop.systemd1"
_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"
_PREFIX = cgroupfs.RUNNER_PREFIX  # "sandboxrun-": units, like runner cgroups, carry our pid
_task_numbers = itertools.count(1)


# ---------------------------------------------------------------- where is the manager's bus


class _Target:
    """How to reach the systemd manager this process may use."""

    def __init__(self, user: bool, address: bytes | None, peer_to_peer: bool, where: str) -> None:
        self.user = user  # the user's own manager (not the system's)
        self.address = address  # None: libsystemd's default for the system/user bus
        self.peer_to_peer = peer_to_peer  # systemd's private socket: no bus daemon in between
        self.where = where

    def connect(self) -> Any:
        from pystemd.dbuslib import DBus, DBusAddress

        if self.address is None:
            return DBus(user_mode=self.user)
        return DBusAddress(self.address, peer_to_peer=self.peer_to_peer)


def _target() -> _Target | str:
    """The system manager as root, else the user manager; a sentence when there is no bus."""
    if os.geteuid() == 0:
        if os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or os.path.exists(
            "/run/dbus/system_bus_socket"
        ):
            return _Target(False, None, False, "system bus")
        if os.path.exists("/run/systemd/private"):  # no dbus daemon: systemctl's own way in
            return _Target(False, b"unix:path=/run/systemd/private", True, "/run/systemd/private")
        return "no system bus (/run/dbus/system_bus_socket) and no /run/systemd/private"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    if os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return _Target(True, None, False, "user bus ($DBUS_SESSION_BUS_ADDRESS)")
    if os.path.exists(f"{runtime}/bus"):
        return _Target(True, f"unix:path={runtime}/bus".encode(), False, f"{runtime}/bus")
    if os.path.exists(f"{runtime}/systemd/private"):  # a user manager without a user bus
        address = f"unix:path={runtime}/systemd/private".encode()
        return _Target(True, address, True, f"{runtime}/systemd/private")
    return (
        f"no bus for this user (uid {os.geteuid()}): neither $DBUS_SESSION_BUS_ADDRESS nor "
        f"{runtime}/bus nor {runtime}/systemd/private; is user@{os.geteuid()}.service running "
        "(`loginctl enable-linger`)?"
    )


def _v2_mount() -> Path | None:
    return next((point for kind, point, _ in cgroupfs.mounts() if kind == "cgroup2"), None)


def _host_reason() -> str | None:
    """Cheap checks without the bus: systemd is PID 1, the hierarchy is pure cgroup v2."""
    if not os.path.isdir("/run/systemd/system"):  # sd_booted()
        return "systemd is not PID 1 (no /run/systemd/system)"
    mount = _v2_mount()
    if mount is None:
        return "not cgroup v2: no cgroup2 filesystem is mounted"
    missing = [name for name in REQUIRED if name not in _controllers(mount, "cgroup.controllers")]
    if missing:
        v1 = {c for kind, _, options in cgroupfs.mounts() if kind == "cgroup" for c in options}
        hybrid = " (hybrid host: cgroup v1 holds it)" if set(missing) & v1 else ""
        return f"not pure cgroup v2: cgroup2 at {mount} has no {' or '.join(missing)}{hybrid}"
    return None


def _cgroup_of(pid: int | str, mount: Path) -> Path | None:
    """The cgroup v2 directory of process ``pid`` ("self" for this one)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    return None


def _slice_name(name: str) -> str:
    if not name.endswith(".slice") or "/" in name or len(name) <= len(".slice"):
        raise ValueError(f"not a systemd slice name: {name!r} (example: {DEFAULT_SLICE})")
    return name


# ---------------------------------------------------------------- the bus


def _property_args(properties: Iterable[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """``a(sv)`` for pystemd's call_method, from (name, D-Bus signature, value) triples.

    Spelled out here instead of pystemd's KNOWN_UNIT_SIGNATURES, which lacks ``PIDs`` and
    ``OOMPolicy`` (still in 0.15) and would have to be patched process-wide.
    """
    from pystemd.dbuslib import apply_signature

    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for name, signature, value in properties:
        args += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), signature.encode())]
        args += apply_signature(signature.encode(), [value])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


class _Bus:
    """One connection to the systemd manager, subscribed to JobRemoved and UnitRemoved."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self._bus = target.connect()
        self._bus.open()
        self._open = True
        self.jobs: dict[bytes, bytes] = {}  # finished job path -> result ("done", "failed", ...)
        self.watched: set[str] = set()  # units with a job of ours under way
        self.removed: set[str] = set()  # our units systemd has dropped
        self._ours = f"{_PREFIX}{os.getpid()}-"  # signals about other units are dropped
        try:
            # Directly on systemd's private socket there is no bus daemon and no sender name.
            sender = None if target.peer_to_peer else _DEST
            # pystemd keeps no reference to a callback: we must.
            self._callbacks = {
                b"JobRemoved": self._job_removed(),
                b"UnitRemoved": self._unit_removed(),
            }
            for member, callback in self._callbacks.items():
                self._bus.match_signal(sender, _PATH, _MANAGER, member, callback)
            self.call(b"Subscribe")  # systemd sends unit and job signals only to subscribers
        except BaseException:
            self.close()
            raise

    def _job_removed(self) -> Callable[..., None]:
        def callback(message: Any, error: Any = None, userdata: Any = None) -> None:
            with contextlib.suppress(Exception):  # pystemd cannot surface it anyway
                message.process_reply(False)
                _, job, unit, result = message.body  # (u id, o job, s unit, s result)
                if bytes(unit).decode() in self.watched:
                    self.jobs[bytes(job)] = bytes(result)

        return callback

    def _unit_removed(self) -> Callable[..., None]:
        def callback(message: Any, error: Any = None, userdata: Any = None) -> None:
            with contextlib.suppress(Exception):
                message.process_reply(False)
                unit = bytes(message.body[0]).decode()  # (s id, o path)
                if unit.startswith(self._ours):
                    self.removed.add(unit)

        return callback

    def __enter__(self) -> _Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._open:  # sd_bus_unref twice would crash
            self._open = False
            self._bus.close()

    def call(self, method: bytes, signature: bytes = b"", values: list[Any] | None = None,
             extra: list[tuple[int, Any]] | None = None) -> Any:  # fmt: skip
        from pystemd.dbuslib import apply_signature

        args = apply_signature(signature, values or []) if signature else []
        args += extra or []
        return self._bus.call_method(_DEST, _PATH, _MANAGER, method, args).body

    def manager_property(self, name: bytes, signature: bytes) -> Any:
        return self._bus.get_property(_DEST, _PATH, _MANAGER, name, signature)

    def _pump(self, done: Callable[[], bool], timeout: float) -> bool:
        """Dispatch incoming signals until ``done()`` or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self._bus.process()  # one message per call; wait() returns at once if more queued
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._bus.wait(int(min(left, 0.5) * 1e6))

    def _job(self, unit: str, method: bytes, values: list[Any], extra: list[Any]) -> str | None:
        """Call a method that queues a job for ``unit``; its result once JobRemoved came."""
        self.watched.add(unit)
        try:
            job = bytes(self.call(method, b"ss", values, extra))
            if not self._pump(lambda: job in self.jobs, JOB_TIMEOUT):
                return None
            return self.jobs.pop(job).decode()
        finally:
            self.watched.discard(unit)

    def start_scope(self, unit: str, properties: list[tuple[str, str, Any]]) -> None:
        """StartTransientUnit, then wait for its job's JobRemoved; raise unless "done"."""
        extra = [*_property_args(properties), (ord("a"), b"(sa(sv))"), (-1, None)]  # no aux
        try:
            result = self._job(unit, b"StartTransientUnit", [unit.encode(), b"fail"], extra)
        except Exception as error:
            raise SandboxrunError(f"systemd refused to start {unit}: {error}") from error
        if result is None:
            raise SandboxrunError(
                f"systemd did not finish starting {unit} within {JOB_TIMEOUT:.0f}s "
                f"(see `journalctl -u {unit}`)"
            )
        if result != "done":
            self.reset_failed(unit)
            raise SandboxrunError(
                f"systemd could not start {unit}: job result {result!r} "
                f"(see `journalctl -u {unit}`)"
            )

    def attach(self, unit: str, subcgroup: str, pids: list[int]) -> None:
        self.call(b"AttachProcessesToUnit", b"ssau", [unit.encode(), subcgroup.encode(), pids])

    def units(self, pattern: str) -> list[tuple[str, str]]:
        """(name, active state) of the loaded units matching ``pattern``."""
        found = self.call(b"ListUnitsByPatterns", b"asas", [[], [pattern.encode()]]) or []
        return [(bytes(row[0]).decode(), bytes(row[3]).decode()) for row in found]  # row: tuple

    def reset_failed(self, unit: str) -> None:
        with contextlib.suppress(Exception):  # not failed, or already gone: fine
            self.call(b"ResetFailedUnit", b"s", [unit.encode()])

    def stop(self, unit: str) -> None:
        """StopUnit and wait for its job (systemd kills what is still inside)."""
        with contextlib.suppress(Exception):  # not loaded (any more): fine
            self._job(unit, b"StopUnit", [unit.encode(), b"replace"], [])

    def wait_removed(self, units: set[str], timeout: float) -> set[str]:
        """Wait until systemd has dropped ``units``; return the ones still there."""
        self._pump(lambda: units <= self.removed, timeout)
        left = units - self.removed
        self.removed -= units
        return left


def _reap_stale(bus: _Bus) -> None:
    """Stop the units of runners that died (SIGKILLed managers): nothing watches those tasks."""
    for unit, _ in bus.units(f"{_PREFIX}*"):
        owner = unit[len(_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            bus.stop(unit)
            bus.reset_failed(unit)


# ---------------------------------------------------------------- runner mode


class _SelfScope:
    """This process's own delegated scope (runner mode), shared by its open backends."""

    _lock = threading.Lock()
    _current: _SelfScope | None = None

    def __init__(self, unit: str, path: Path, origin: Path | None, target: _Target) -> None:
        self.unit = unit
        self.path = path
        self.origin = origin  # where this process was before; it goes back there if it may
        self.target = target
        self.pid = os.getpid()
        self.refs = 0

    @classmethod
    def acquire(cls, target: _Target, slice_name: str, mount: Path) -> _SelfScope:
        with cls._lock:
            scope = cls._current
            if scope is None or scope.pid != os.getpid() or not scope.path.is_dir():
                scope = cls._create(target, slice_name, mount)
                cls._current = scope
            scope.refs += 1
            return scope

    @classmethod
    def _create(cls, target: _Target, slice_name: str, mount: Path) -> _SelfScope:
        pid = os.getpid()
        unit = f"{cgroupfs.runner_dir_name()}.scope"
        origin = _cgroup_of("self", mount)
        with _Bus(target) as bus:
            _reap_stale(bus)
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
        path = _cgroup_of("self", mount)
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
                _SelfScope._current = None
            # else: we stay in the scope (reused by the next acquire); it ends with the process

    def _leave(self) -> bool:
        """Move back to the original cgroup and wait until systemd has dropped the empty scope."""
        origin = self.origin
        if origin is None or not os.access(origin / "cgroup.procs", os.W_OK):
            return False  # e.g. a root-owned login session: we may not go back
        with _Bus(self.target) as bus:  # subscribed before the scope empties
            try:
                for pid in cgroupfs.pids(self.path):
                    cgroupfs.write(origin / "cgroup.procs", pid)
            except OSError:
                return False  # gone (an empty transient scope), or now an inner cgroup
            if bus.wait_removed({self.unit}, JOB_TIMEOUT):
                bus.stop(self.unit)
            bus.reset_failed(self.unit)
        return True


# ---------------------------------------------------------------- task mode


class _Keeper:
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
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/oom_score_adj").write_text("-1000")

    def stop(self) -> None:
        if self.fd < 0:
            return
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
    if cpu_quota is not None:
        properties.append(("CPUQuotaPerSecUSec", "t", round(cpu_quota * 1_000_000)))
    if limits.wall_time_seconds is not None:
        backstop = limits.wall_time_seconds * 1.1 + RUNTIME_GRACE_SECONDS
        properties.append(("RuntimeMaxUSec", "t", round(backstop * 1_000_000)))
    return properties


class SystemdScopeSandbox(Sandbox):
    """One task in its own transient scope (``scope_mode="task"``)."""

    def __init__(self, backend: SystemdBackend, limits: Limits) -> None:
        bus = backend._bus
        assert bus is not None and backend.mount is not None
        self.backend = backend
        self.unit = f"{cgroupfs.runner_dir_name()}-{next(_task_numbers)}.scope"
        self.removed = False
        self.peak_sampled = 0
        self.keeper = _Keeper(backend.keeper_program)
        started = False
        try:
            self._start(bus, limits)
            started = True
            path = _cgroup_of(self.keeper.pid, backend.mount)
            if path is None or path.name != self.unit:
                raise SandboxrunError(f"systemd started {self.unit}, but its keeper is in {path}")
            self.path = path
            self.task = path / "task"
            os.mkdir(self.task)
        except BaseException:
            self.keeper.stop()
            if started:
                backend._pending.add(self.unit)
            raise
        backend._live[self.unit] = self
        self.files = backend._task_files(path)
        if not self.files["memory.peak"]:
            self.poll_interval_seconds = _PEAK_SAMPLE_SECONDS
        # The worker moves itself when it may write to the common ancestor (root); else systemd
        # places it (the user manager asks the system manager when it may not either).
        self.parent_attach = not backend._may_enter(self.task)

    def _start(self, bus: _Bus, limits: Limits) -> None:
        backend = self.backend
        properties = task_properties(
            limits, self.keeper.pid, backend.slice, backend.cpu_quota, backend._oom_policy
        )
        try:
            bus.start_scope(self.unit, properties)
        except SandboxrunError as error:
            if not (backend._oom_policy and "OOMPolicy" in str(error)):
                raise
            backend._oom_policy = False  # systemd too old for OOMPolicy on scopes
            bus.start_scope(self.unit, [p for p in properties if p[0] != "OOMPolicy"])

    def enter_files(self) -> tuple[str, ...]:
        return () if self.parent_attach else (str(self.task / "cgroup.procs"),)

    def attach(self, pid: int) -> None:
        if self.parent_attach:
            assert self.backend._bus is not None
            self.backend._bus.attach(self.unit, "/task", [pid])

    def poll(self) -> str | None:
        current = cgroupfs.read_int(self.path / "memory.current")
        self.peak_sampled = max(self.peak_sampled, current or 0)
        return None

    def kill(self) -> None:
        _kill_all(self.task, self.files["cgroup.kill"])

    def collect(self) -> Usage:
        if cgroupfs.pids(self.task):
            self.kill()
        _wait_empty(self.task, _EMPTY_TIMEOUT)
        # The scope's own files, still there: the keeper holds it. Its counters cover the task
        # (the keeper charges nothing: it was spawned, and its pages charged, before it moved).
        if self.files["memory.peak"]:
            peak = cgroupfs.read_int(self.path / "memory.peak")
        else:
            self.poll()
            peak = self.peak_sampled
        events = cgroupfs.read_keyed(self.path / "memory.events")
        cpu = cgroupfs.read_keyed(self.path / "cpu.stat").get("usage_usec")
        return Usage(
            peak_memory_bytes=peak,
            oom_killed=events.get("oom_kill", 0) > 0 or events.get("oom_group_kill", 0) > 0,
            memory_limit_hit=events.get("max", 0) > 0 or events.get("oom", 0) > 0,
            process_limit_hit=cgroupfs.read_keyed(self.path / "pids.events").get("max", 0) > 0,
            cpu_time_seconds=None if cpu is None else cpu / 1e6,
        )

    def remove(self) -> None:
        if self.removed:
            return
        try:
            cgroupfs.remove(self.task)
        except OSError:
            _kill_all(self.task, self.files["cgroup.kill"])
            _wait_empty(self.task, _EMPTY_TIMEOUT)
            with contextlib.suppress(OSError):
                cgroupfs.remove(self.task)
        # Now the scope is empty: systemd stops and collects it (close() waits for that).
        self.keeper.stop()
        self.backend._live.pop(self.unit, None)
        self.backend._pending.add(self.unit)
        self.removed = True


# ---------------------------------------------------------------- the backend


class SystemdBackend(CgroupV2Backend):
    """Kernel-enforced limits in a cgroup that systemd delegates (see the module docstring)."""

    name = "systemd"
    kernel_enforced = CgroupV2Backend.kernel_enforced

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
        if cpu_quota is not None and not (isinstance(cpu_quota, (int, float)) and cpu_quota > 0):
            raise ValueError(f"cpu_quota must be a positive number of CPUs, got {cpu_quota!r}")
        self.scope_mode = mode
        self.slice = _slice_name(slice_name or os.environ.get(SLICE_ENV) or DEFAULT_SLICE)
        self.cpu_quota = cpu_quota
        target = _target()
        assert isinstance(target, _Target)
        self.target = target
        self.mount = _v2_mount()
        assert self.mount is not None
        self.place = _Place(self.mount, self.mount, move_self=True)  # the real one: open()
        self._runner: _Runner | None = None
        self._scope: _SelfScope | None = None
        self._bus: _Bus | None = None
        self._live: dict[str, SystemdScopeSandbox] = {}  # task scopes not removed yet
        self._pending: set[str] = set()  # task scopes released, not yet seen gone
        self._oom_policy = True
        self._enter_verdict: bool | None = None
        self._probed: dict[str, bool] | None = None
        self.keeper_program = shutil.which("cat", path="/usr/bin:/bin") or "/bin/cat"
        self.files = _probe_files(self.place, None)
        self._set_enforced()

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
            cls._probes[key] = cls._probe()
        return cls._probes[key]

    @classmethod
    def _probe(cls) -> str | dict[str, Any]:
        """A sentence why not, or facts about the manager. Reads only (and asks the bus)."""
        reason = _host_reason()
        if reason is not None:
            return reason
        try:
            importlib.import_module("pystemd.dbuslib")
        except ImportError as error:
            return f"pystemd is not installed ({error}): {INSTALL_HINT}"
        target = _target()
        if isinstance(target, str):
            return target
        try:
            with _Bus(target) as bus:
                version = bytes(bus.manager_property(b"Version", b"s")).decode()
                cgroup = bytes(bus.manager_property(b"ControlGroup", b"s")).decode()
        except Exception as error:
            who = "the user manager" if target.user else "the system manager"
            return f"no bus for this user: {who} does not answer on {target.where} ({error})"
        facts: dict[str, Any] = {"systemd": version, "bus": target.where, "manager_cgroup": cgroup}
        if target.user:
            mount = _v2_mount()
            assert mount is not None
            where = mount / cgroup.lstrip("/")
            missing = [n for n in REQUIRED if n not in _controllers(where, "cgroup.controllers")]
            if missing:
                return (
                    f"the user manager's cgroup {where} is not delegated the "
                    f"{' and '.join(missing)} controller (user@.service needs Delegate=yes)"
                )
        return facts

    @classmethod
    def unavailable_reason(cls) -> str | None:
        verdict = cls._verdict()
        return verdict if isinstance(verdict, str) else None

    def details(self) -> dict[str, object]:
        verdict = self._verdict()
        facts = dict(verdict) if isinstance(verdict, dict) else {}
        facts.update(
            {
                "scope_mode": self.scope_mode,
                "slice": self.slice,
                "manager": "user" if self.target.user else "system",
                "unit": (
                    f"{_PREFIX}<pid>-<rand>.scope, once per process"
                    if self.scope_mode == "runner"
                    else f"{_PREFIX}<pid>-<rand>-<n>.scope, one per task"
                ),
                "scope": None if self._scope is None else self._scope.unit,
                "oom_policy": "continue" if self._oom_policy else "systemd default (too old)",
            }
        )
        if self.scope_mode == "runner" and self._runner is not None:
            facts["cgroup_v2"] = super().details()
        return facts

    # ------------------------------------------------------------ life cycle

    def open(self) -> None:
        assert self.mount is not None
        if self.scope_mode == "task":
            self._bus = _Bus(self.target)
            try:
                _reap_stale(self._bus)
            except BaseException:
                self._bus.close()
                self._bus = None
                raise
            return
        if _Runner.active() is None:
            self._scope = _SelfScope.acquire(self.target, self.slice, self.mount)
            place: _Place | None = _Place(self.mount, self._scope.path, move_self=True)
        else:
            place = None  # this process already has a delegated runner (cgroup_v2): share it
        try:
            self._runner = _Runner.acquire(place)
        except BaseException:
            if self._scope is not None:
                self._scope.release()
                self._scope = None
            raise
        self.place = self._runner.place
        self.files = _probe_files(self.place, self._runner.path)
        self._set_enforced()

    def close(self) -> None:
        runner, self._runner = self._runner, None
        scope, self._scope = self._scope, None
        try:
            if runner is not None:
                runner.release()
        finally:
            if scope is not None:
                scope.release()
            bus, self._bus = self._bus, None
            if bus is not None:
                try:
                    self._collect_scopes(bus)
                finally:
                    bus.close()

    def _collect_scopes(self, bus: _Bus) -> None:
        """Wait until systemd has dropped every task scope we made; reset failed ones."""
        for sandbox in list(self._live.values()):  # the manager removes them; just in case
            with contextlib.suppress(Exception):
                sandbox.remove()
        pending, self._pending = self._pending, set()
        left = bus.wait_removed(pending, JOB_TIMEOUT)
        for unit, state in bus.units(f"{_PREFIX}{os.getpid()}-*"):
            if unit in left or (unit in pending and state == "failed"):
                bus.stop(unit)
                bus.reset_failed(unit)

    def sandbox(self, limits: Limits) -> Sandbox:
        if self.scope_mode == "runner":
            return super().sandbox(limits)
        if self._bus is None:
            raise RuntimeError("SystemdBackend.sandbox() before open()")
        return SystemdScopeSandbox(self, limits)

    # ------------------------------------------------------------ task mode helpers

    def _task_files(self, scope: Path) -> dict[str, bool]:
        if self._probed is None:
            self._probed = _probe_files(self.place, scope)
            self.files = self._probed
            self._set_enforced()
        return self._probed

    def _may_enter(self, task: Path) -> bool:
        """May a worker (forked from us, so in our cgroup) move itself into ``task``?"""
        if self._enter_verdict is None:
            own = None if self.mount is None else _cgroup_of("self", self.mount)
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
