"""The systemd backend: detection anywhere; scopes, limits and cleanup where systemd runs."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from sandboxrun import BACKEND_NAMES, BackendUnavailable, ProcessManager, Task
from sandboxrun._backends import cgroupfs, create_backend, detect, hosts
from sandboxrun._backends import systemd as sd
from sandboxrun._backends.systemd import SystemdBackend
from sandboxrun._backends.systemd import backend as sdb
from sandboxrun._backends.systemd import bus as sdbus
from sandboxrun._limits import Limits

from . import tasks
from .conftest import SCALE, leftover_cgroups, wait_gone

GIB = 1024**3
REASON = SystemdBackend.unavailable_reason()
needs_systemd = pytest.mark.skipif(REASON is not None, reason=f"systemd backend: {REASON}")
MODES = ["runner", "task"]


# ---------------------------------------------------------------- anywhere


def test_registry_order_puts_systemd_after_cgroup_v2():
    names = list(BACKEND_NAMES)
    assert names.index("cgroup_v2") < names.index("systemd") < names.index("cgroup_v1")


def test_unavailable_reason_is_precise():
    report = detect()["backends"]["systemd"]
    if report["available"]:
        pytest.skip("the systemd backend works here")
    reason = report["reason"]
    known = (
        "systemd is not PID 1",
        "not cgroup v2",
        "not pure cgroup v2",
        "pystemd is not installed",
        "no bus for this user",
        "no system bus",
        "the user manager's cgroup",
    )
    assert reason.startswith(known), reason
    if "pystemd" in reason:
        assert sd.INSTALL_HINT in reason
    with pytest.raises(BackendUnavailable, match="systemd"):
        create_backend("systemd")


HYBRID_MOUNTINFO = (
    "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    "36 25 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
    "37 25 0:32 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids\n"
)


def test_reason_names_each_missing_piece(monkeypatch, tmp_path):
    # Fake files through the modules' path constants: nothing process-wide is patched.
    absent = tmp_path / "no-systemd"
    monkeypatch.setattr(hosts, "SYSTEMD_RUN_DIR", absent)
    monkeypatch.setattr(SystemdBackend, "_probes", {})
    assert SystemdBackend.unavailable_reason() == f"systemd is not PID 1 (no {absent})"

    monkeypatch.setattr(hosts, "SYSTEMD_RUN_DIR", tmp_path)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    monkeypatch.setattr(cgroupfs, "CGROUP_MOUNTS", mountinfo)
    monkeypatch.setattr(SystemdBackend, "_probes", {})
    assert SystemdBackend.unavailable_reason() == (
        "not cgroup v2: no cgroup2 filesystem is mounted"
    )

    mountinfo.write_text(HYBRID_MOUNTINFO)  # an empty cgroup2 beside v1 memory and pids
    monkeypatch.setattr(SystemdBackend, "_probes", {})
    reason = SystemdBackend.unavailable_reason()
    assert reason.startswith("not pure cgroup v2: cgroup2 at /sys/fs/cgroup/unified has no ")
    assert reason.endswith("(hybrid host: cgroup v1 holds them)"), reason

    monkeypatch.setattr(SystemdBackend, "_probes", {})
    monkeypatch.setattr(sdb, "host_reason", lambda: None)
    monkeypatch.setitem(sys.modules, "pystemd", None)  # import pystemd -> ImportError
    monkeypatch.setitem(sys.modules, "pystemd.dbuslib", None)
    reason = SystemdBackend.unavailable_reason()
    assert reason.startswith("pystemd is not installed") and sd.INSTALL_HINT in reason


def test_user_bus_lookup(monkeypatch, tmp_path):
    monkeypatch.setattr(sdbus.os, "geteuid", lambda: 4321)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    reason = sdbus.target()
    assert isinstance(reason, str) and reason.startswith("no bus for this user (uid 4321)")
    assert "user@4321.service" in reason

    (tmp_path / "systemd").mkdir()
    (tmp_path / "systemd" / "private").touch()
    target = sdbus.target()
    assert isinstance(target, sdbus.Target) and target.user and target.peer_to_peer
    assert target.address == f"unix:path={tmp_path}/systemd/private".encode()

    (tmp_path / "bus").touch()  # a user bus wins over the private socket
    target = sdbus.target()
    assert isinstance(target, sdbus.Target) and target.user and not target.peer_to_peer

    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/somewhere")
    target = sdbus.target()
    assert isinstance(target, sdbus.Target) and target.user and target.address is None


def test_task_scope_properties():
    limits = Limits(wall_time_seconds=10, memory_bytes=256 * 1024**2, max_processes=30)
    properties = {name: (sig, value) for name, sig, value in sd.task_properties(
        limits, 4242, "sandboxrun.slice", cpu_quota=1.5
    )}  # fmt: skip
    assert properties["PIDs"] == ("au", [4242])
    assert properties["Delegate"] == ("b", True)
    assert properties["Slice"] == ("s", "sandboxrun.slice")
    assert properties["CollectMode"] == ("s", "inactive-or-failed")
    assert properties["OOMPolicy"] == ("s", "continue")
    assert properties["MemoryMax"] == ("t", 256 * 1024**2)
    assert properties["MemorySwapMax"] == ("t", 0)
    assert properties["TasksMax"] == ("t", 31)  # the keeper counts too
    assert properties["CPUQuotaPerSecUSec"] == ("t", 1_500_000)
    runtime = properties["RuntimeMaxUSec"][1] / 1e6
    assert 10 < runtime <= 10 * 1.1 + sd.RUNTIME_GRACE_SECONDS + 1e-6  # a backstop, not the limit
    assert properties["KillSignal"] == ("i", signal.SIGKILL)

    bare = {name for name, _, _ in sd.task_properties(Limits(), 1, "x.slice", oom_policy=False)}
    assert bare == {"PIDs", "Delegate", "Slice", "Description", "CollectMode", "KillSignal"}


def test_constructor_checks_its_arguments(monkeypatch):
    monkeypatch.setattr(SystemdBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(sdb, "target", lambda: sdbus.Target(False, None, False, "test"))
    pure = hosts.CgroupHost(
        pathlib.Path("/sys/fs/cgroup"), frozenset({"memory", "pids"}), frozenset(), False
    )
    monkeypatch.setattr(hosts, "cgroup_host", lambda: pure)
    monkeypatch.delenv(sd.SLICE_ENV, raising=False)
    monkeypatch.delenv(sd.MODE_ENV, raising=False)
    backend = SystemdBackend()
    assert (backend.scope_mode, backend.slice) == ("runner", "sandboxrun.slice")
    monkeypatch.setenv(sd.SLICE_ENV, "batch.slice")
    monkeypatch.setenv(sd.MODE_ENV, "task")
    backend = SystemdBackend()
    assert (backend.scope_mode, backend.slice) == ("task", "batch.slice")
    assert SystemdBackend(slice_name="other.slice", scope_mode="runner").slice == "other.slice"
    with pytest.raises(ValueError, match="scope_mode"):
        SystemdBackend(scope_mode="service")
    with pytest.raises(ValueError, match="slice"):
        SystemdBackend(slice_name="sandboxrun")
    with pytest.raises(ValueError, match="cpu_quota"):
        SystemdBackend(cpu_quota=0)


# ---------------------------------------------------------------- where systemd runs


def own_cgroup() -> str:
    return pathlib.Path("/proc/self/cgroup").read_text().strip().partition("::")[2]


def scope_facts():
    """Inside a task: its cgroup and the limits systemd wrote on the scope above it."""
    own = own_cgroup()
    scope = pathlib.Path("/sys/fs/cgroup" + own).parent
    return own, (scope / "memory.max").read_text().strip(), (scope / "pids.max").read_text().strip()


def systemctl(*args: str) -> str:
    user = [] if os.geteuid() == 0 else ["--user"]
    return subprocess.run(
        ["systemctl", *user, *args], capture_output=True, text=True, check=False
    ).stdout.strip()


def our_units() -> list[str]:
    """Our units, but the scope this process lives in: it stays when we may not go back."""
    listed = systemctl(
        "list-units", "--all", "--plain", "--no-legend", f"sandboxrun-{os.getpid()}-*"
    )
    return [
        line for line in listed.splitlines() if f"/{line.split()[0]}/" not in own_cgroup() + "/"
    ]


def failed_units() -> str:
    return systemctl("list-units", "--failed", "--plain", "--no-legend", "sandboxrun-*.scope")


def assert_clean() -> None:
    mine = own_cgroup() + "/"
    assert not [
        p for p in leftover_cgroups() if not mine.startswith(p[len("/sys/fs/cgroup") :] + "/")
    ]
    assert not our_units() and not failed_units()


def run(mode, func, *args, **limits):
    with ProcessManager(1, backend=SystemdBackend(scope_mode=mode), **limits) as manager:
        manager.queue_task(Task(func, args))
    result = manager.task_results[0]
    assert result.backend == "systemd"
    assert_clean()
    return result


@needs_systemd
def test_runner_scope_is_made_delegated_and_gone_afterwards():
    before = own_cgroup()
    backend = SystemdBackend(scope_mode="runner")
    backend.open()
    try:
        unit = backend.unit
        assert unit is not None and backend.scope_path is not None
        assert unit.startswith(f"sandboxrun-{os.getpid()}-") and unit.endswith(".scope")
        assert f"/{backend.slice}/" in own_cgroup() and f"/{unit}/" in own_cgroup()
        assert systemctl("show", "-p", "Delegate", "--value", unit) == "yes"
        if os.geteuid() == 0:  # the system manager marks it (a user manager may not)
            assert os.getxattr(backend.scope_path, "trusted.delegate") == b"1"
        assert unit in systemctl("list-units", "--plain", "--no-legend", unit)
        assert backend.runner_path is not None and backend.runner_path.parent.name == unit
    finally:
        backend.close()
    if os.access(f"/sys/fs/cgroup{before}/cgroup.procs", os.W_OK):
        assert own_cgroup() == before  # back where we came from, the scope is gone
        assert not our_units()
    assert not failed_units()


@needs_systemd
def test_task_scope_carries_the_limits_as_unit_properties():
    limits = {"memory_limit_in_gib": 0.25, "max_processes": 20}
    # isolation none: the task reads its scope's files by host cgroup path, which its own
    # cgroup namespace (every profile's) would show as "/"
    result = run("task", scope_facts, isolation="none", **limits)
    assert result.success, result.exception
    own, memory_max, pids_max = result.result
    scope = pathlib.PurePath(own).parent.name
    assert own.endswith("/task") and scope.startswith(f"sandboxrun-{os.getpid()}-")
    assert f"/{sd.DEFAULT_SLICE}/" in own
    assert (int(memory_max), int(pids_max)) == (GIB // 4, 21)


@needs_systemd
@pytest.mark.parametrize("mode", MODES)
def test_normal_task(mode):
    result = run(mode, tasks.double, 21)
    assert (result.success, result.result, result.exit_code) == (True, 42, 0)
    assert result.max_memory_used_in_gib > 0


@needs_systemd
@pytest.mark.parametrize("mode", MODES)
def test_out_of_memory_with_the_kernel_peak(mode):
    result = run(mode, tasks.allocate, 64, 16, memory_limit_in_gib=0.25)
    assert (result.success, result.out_of_memory, result.timed_out) == (False, True, False)
    assert isinstance(result.exception, MemoryError)
    assert result.exit_code == -signal.SIGKILL
    assert 0.25 * 0.75 <= result.max_memory_used_in_gib <= 0.25


@needs_systemd
@pytest.mark.parametrize("mode", MODES)
def test_timeout_kills_the_tree(mode, tmp_path):
    pid_file = tmp_path / "pid"
    result = run(mode, tasks.spawn_grandchild, str(pid_file), 60, worker_timeout_seconds=1 * SCALE)
    assert result.timed_out and isinstance(result.exception, TimeoutError)
    assert result.exit_code == -signal.SIGKILL
    assert wait_gone(tasks.read_pid(pid_file))


@needs_systemd
@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained(mode):
    result = run(
        mode, tasks.fork_bomb, 0.5 * SCALE, max_processes=30, worker_timeout_seconds=30 * SCALE
    )
    assert result.success and not result.timed_out
    assert result.result >= 20  # forked up to the cap (the worker counts), then refused
    after = run(mode, tasks.double, 1, max_processes=30)
    assert after.success and after.result == 2


@needs_systemd
def test_task_mode_runs_tasks_side_by_side():
    with ProcessManager(3, backend=SystemdBackend(scope_mode="task")) as manager:
        for index in range(6):
            manager.queue_task(Task(tasks.pid_and_value, (index,)))
    assert sorted(r.result[1] for r in manager.task_results) == list(range(6))
    assert_clean()
