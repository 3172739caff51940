"""Unit tests of the cgroupfs helpers, host detection, CPU quotas and backend options.

Everything reads fake files under tmp_path: the modules' path constants are monkeypatched
(cgroupfs.CGROUP_MOUNTS, PROC_SELF_CGROUP, PROC; hosts.SYSTEMD_RUN_DIR), nothing process-wide.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from sandboxrun import _cpus
from sandboxrun._backends import accepted_options, cgroupfs, hosts
from sandboxrun._backends.base import Backend, Sandbox
from sandboxrun._backends.cgroup_v2 import RunnerSession
from sandboxrun._backends.cgroup_v2 import place as v2place
from sandboxrun._backends.cgroup_v2.counters import (
    KERNEL_ENFORCED,
    kernel_at_least,
    probe_files,
    read_usage,
)

from .conftest import wait_gone


def fake_mountinfo(monkeypatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    monkeypatch.setattr(cgroupfs, "CGROUP_MOUNTS", path)


def fake_own_cgroups(monkeypatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "self-cgroup"
    path.write_text(text)
    monkeypatch.setattr(cgroupfs, "PROC_SELF_CGROUP", path)


# ---------------------------------------------------------------- mountinfo, /proc/self/cgroup


def test_mountinfo_parsing(monkeypatch, tmp_path):
    fake_mountinfo(
        monkeypatch,
        tmp_path,
        "24 30 0:21 / /sys/fs/cgroup ro,nosuid shared:3 - tmpfs tmpfs ro,mode=755\n"
        "25 24 0:22 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
        "26 24 0:23 / /sys/fs/cgroup/cpu,cpuacct rw shared:5 master:1"
        " - cgroup cgroup rw,cpu,cpuacct\n"
        "27 24 0:24 / /mnt/my\\040cgroups rw - cgroup none rw,memory\n"
        "28 24 0:25 / /mnt/tab\\011and\\134slash rw - cgroup cgroup rw,name=systemd\n"
        "29 24 0:26 / /proc rw - proc proc rw\n"
        "garbage line without the separator\n",
    )
    assert cgroupfs.mounts() == [
        ("cgroup2", Path("/sys/fs/cgroup/unified"), {"rw", "nsdelegate"}),
        ("cgroup", Path("/sys/fs/cgroup/cpu,cpuacct"), {"rw", "cpu", "cpuacct"}),
        ("cgroup", Path("/mnt/my cgroups"), {"rw", "memory"}),
        ("cgroup", Path("/mnt/tab\tand\\slash"), {"rw", "name=systemd"}),
    ]
    assert cgroupfs.mounts()[0].fstype == "cgroup2"


def test_mountinfo_unreadable_is_no_mounts(monkeypatch, tmp_path):
    monkeypatch.setattr(cgroupfs, "CGROUP_MOUNTS", tmp_path / "absent")
    assert cgroupfs.mounts() == []


def test_proc_self_cgroup_parsing(monkeypatch, tmp_path):
    fake_own_cgroups(
        monkeypatch,
        tmp_path,
        "12:memory:/process_api/abc\n4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n"
        "0::/user.slice/odd:name\n",
    )
    assert cgroupfs.own_cgroups() == {
        "memory": "/process_api/abc",
        "cpu,cpuacct": "/",
        "name=systemd": "/init.scope",
        "": "/user.slice/odd:name",  # split at the first two colons only
    }
    monkeypatch.setattr(cgroupfs, "PROC_SELF_CGROUP", tmp_path / "absent")
    assert cgroupfs.own_cgroups() == {}


# ---------------------------------------------------------------- host layout


def make_v2(tmp_path: Path, controllers: str) -> Path:
    mount = tmp_path / "v2"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    return mount


def v2_line(mount: Path) -> str:
    return f"30 24 0:30 / {mount} rw - cgroup2 cgroup2 rw\n"


V1_MEMORY_PIDS = (
    "31 24 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "32 24 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
)


def test_hybrid_host(monkeypatch, tmp_path):
    mount = make_v2(tmp_path, "")
    fake_mountinfo(monkeypatch, tmp_path, v2_line(mount) + V1_MEMORY_PIDS)
    host = hosts.cgroup_host()
    assert host.layout == "hybrid" and host.v2_mount == mount
    assert host.v2_missing(("memory", "pids")) == ["memory", "pids"]
    assert host.v2_lacks(("memory", "pids")) == (
        f"cgroup2 at {mount} has no memory or pids controllers (hybrid host: cgroup v1 holds them)"
    )
    # The cgroup v2 backend says the same sentence.
    assert v2place.locate() == host.v2_lacks(("memory", "pids"))


def test_missing_controller_not_held_by_v1_is_no_hybrid_note(monkeypatch, tmp_path):
    mount = make_v2(tmp_path, "cpu memory")
    fake_mountinfo(monkeypatch, tmp_path, v2_line(mount) + V1_MEMORY_PIDS.splitlines()[0] + "\n")
    assert hosts.cgroup_host().v2_lacks(("memory", "pids")) == (
        f"cgroup2 at {mount} has no pids controller"
    )


def test_unified_legacy_and_no_cgroups(monkeypatch, tmp_path):
    mount = make_v2(tmp_path, "cpuset cpu io memory pids")
    fake_mountinfo(monkeypatch, tmp_path, v2_line(mount))
    host = hosts.cgroup_host()
    assert host.layout == "unified" and host.v2_lacks(("memory", "pids")) is None
    assert host.v2_controllers == {"cpuset", "cpu", "io", "memory", "pids"}

    fake_mountinfo(monkeypatch, tmp_path, V1_MEMORY_PIDS)
    host = hosts.cgroup_host()
    assert host.layout == "legacy" and host.v2_mount is None
    assert host.v2_lacks(("memory",)) == "no cgroup2 filesystem is mounted"
    assert host.v1_controllers >= {"memory", "pids"}

    fake_mountinfo(monkeypatch, tmp_path, "")
    assert hosts.cgroup_host().layout == "none"


def test_systemd_booted_reads_its_run_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(hosts, "SYSTEMD_RUN_DIR", tmp_path)
    assert hosts.systemd_booted()
    monkeypatch.setattr(hosts, "SYSTEMD_RUN_DIR", tmp_path / "absent")
    assert not hosts.systemd_booted()


# ---------------------------------------------------------------- CPU quota (_cpus.py)


@pytest.fixture
def cpu_host(monkeypatch, tmp_path):
    """A v2 mount (own cgroup /a/b) and a v1 cpu,cpuacct mount (own cgroup /x), no quotas."""
    v2 = tmp_path / "mnt" / "v2"
    (v2 / "a" / "b").mkdir(parents=True)
    v1 = tmp_path / "mnt" / "cpu,cpuacct"
    (v1 / "x").mkdir(parents=True)
    fake_mountinfo(
        monkeypatch,
        tmp_path,
        f"30 24 0:30 / {v2} rw - cgroup2 cgroup2 rw\n"
        f"31 24 0:31 / {v1} rw - cgroup cgroup rw,cpu,cpuacct\n",
    )
    fake_own_cgroups(monkeypatch, tmp_path, "4:cpu,cpuacct:/x\n0::/a/b\n")
    monkeypatch.setattr(_cpus, "affinity_count", lambda: 8)
    return v2, v1


def test_no_quota_means_the_affinity(cpu_host):
    v2, v1 = cpu_host
    (v2 / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (v1 / "x" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "x" / "cpu.cfs_period_us").write_text("100000\n")
    # Above the mount points: never read (not this hierarchy).
    (v2.parent / "cpu.max").write_text("10000 100000\n")
    assert _cpus.cgroup_quota() is None
    assert _cpus.available_cpus() == 8


def test_v2_cpu_max_smallest_on_the_path_up(cpu_host):
    v2, _ = cpu_host
    (v2 / "a" / "b" / "cpu.max").write_text("250000 100000\n")
    (v2 / "a" / "cpu.max").write_text("150000 100000\n")
    assert _cpus.cgroup_quota() == 1.5
    assert _cpus.available_cpus() == 2  # rounded up
    (v2 / "a" / "cpu.max").write_text("50000 100000\n")
    assert _cpus.cgroup_quota() == 0.5
    assert _cpus.available_cpus() == 1  # never below one


def test_v1_cfs_quota(cpu_host, monkeypatch):
    _, v1 = cpu_host
    (v1 / "x" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "x" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cpus.cgroup_quota() == 3.0
    assert _cpus.available_cpus() == 3
    monkeypatch.setattr(_cpus, "affinity_count", lambda: 2)
    assert _cpus.available_cpus() == 2  # the affinity is smaller: it wins


def test_unreadable_quota_files_are_no_quota(cpu_host):
    v2, v1 = cpu_host
    (v2 / "a" / "b" / "cpu.max").write_text("garbage\n")
    (v1 / "x" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "x" / "cpu.cfs_period_us").write_text("0\n")  # no division by zero
    assert _cpus.cgroup_quota() is None


def test_affinity_is_this_process_cpu_set():
    assert _cpus.affinity_count() == len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- stale runners


@pytest.fixture
def fake_proc(monkeypatch, tmp_path):
    proc = tmp_path / "proc"
    (proc / "1234").mkdir(parents=True)
    monkeypatch.setattr(cgroupfs, "PROC", proc)
    return proc


def test_stale_runner_dirs(tmp_path, fake_proc):
    parent = tmp_path / "cg"
    for name in ("sandboxrun-1234-aa", "sandboxrun-5678-bb", "sandboxrun-xyz-cc", "other-5678"):
        (parent / name).mkdir(parents=True)
    (parent / "sandboxrun-5679-file").write_text("")  # not a directory
    assert cgroupfs.stale_runner_dirs(parent) == [parent / "sandboxrun-5678-bb"]
    assert cgroupfs.stale_runner_dirs(tmp_path / "absent") == []

    (parent / "sandboxrun-5678-bb" / "task-1").mkdir()
    cgroupfs.reap_stale(parent)  # no processes in it: just removed, deepest first
    assert sorted(p.name for p in parent.iterdir()) == [
        "other-5678",
        "sandboxrun-1234-aa",
        "sandboxrun-5679-file",
        "sandboxrun-xyz-cc",
    ]


def test_walk_finds_every_sub_cgroup_and_skips_files(tmp_path):
    # subdirs() trusts a link count of exactly 2 to mean "no subdirectory" (kernfs and local
    # filesystems keep it); a directory with children must still be listed, files skipped.
    root = tmp_path / "task-1"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "cgroup.procs").write_text("")
    (root / "a" / "memory.max_usage_in_bytes").write_text("0")
    assert sorted(cgroupfs.subdirs(root)) == [root / "a", root / "b"]
    assert cgroupfs.subdirs(root / "b") == []
    assert cgroupfs.subdirs(tmp_path / "absent") == []
    assert sorted(cgroupfs.walk(root)) == [root, root / "a", root / "a" / "deep", root / "b"]


def _own_v1_memory_cgroup() -> Path:
    memory = next((m.point for m in cgroupfs.mounts() if "memory" in m.options), None)
    own = cgroupfs.own_cgroups().get("memory")
    if memory is None or own is None:
        pytest.skip("no cgroup v1 memory hierarchy")
    parent = memory / own.lstrip("/")
    if not os.access(parent, os.W_OK):
        pytest.skip(f"{parent} is not writable")
    return parent


def test_kept_open_counter_files_read_the_value_of_the_moment():
    root = _own_v1_memory_cgroup() / cgroupfs.runner_dir_name()
    root.mkdir()
    kept = cgroupfs.OpenFiles()
    try:
        limit = root / "memory.limit_in_bytes"
        for value in (100 << 20, 200 << 20, 50 << 20):
            kept.write(limit, value)  # the same fd each time
            assert cgroupfs.read_int(limit, kept) == value  # pread(0): made afresh
            assert cgroupfs.read_int(limit) == value
        assert cgroupfs.read_keyed(root / "memory.oom_control", kept)["oom_kill"] == 0
        assert cgroupfs.read_int(root / "absent", kept) is None
    finally:
        kept.close()
        cgroupfs.remove_tree(root)


def test_walk_on_a_real_cgroup_sees_a_sub_cgroup():
    root = _own_v1_memory_cgroup() / cgroupfs.runner_dir_name()
    root.mkdir()
    try:
        assert cgroupfs.subdirs(root) == []  # ~35 control files, no subdirectory
        (root / "sub").mkdir()
        assert cgroupfs.walk(root) == [root, root / "sub"]
    finally:
        cgroupfs.remove_tree(root)
    assert not root.exists()


def test_unit_names_carry_the_owner(fake_proc):
    assert cgroupfs.runner_owner("sandboxrun-5678-abcdef-3.scope") == 5678
    assert cgroupfs.runner_owner("sandboxrun-nodelegate-root.service") is None
    assert cgroupfs.is_stale("sandboxrun-5678-abcdef.scope")
    assert not cgroupfs.is_stale("sandboxrun-1234-abcdef.scope")
    assert not cgroupfs.is_stale("user@1000.service")


# ---------------------------------------------------------------- logging


def test_every_write_and_kill_is_logged(tmp_path, caplog):
    target = tmp_path / "pids.max"
    target.write_text("")
    child = subprocess.Popen(["sleep", "30"])
    try:
        with caplog.at_level(logging.DEBUG, logger="sandboxrun.cgroup"):
            cgroupfs.write(target, 64)
            cgroupfs.kill_pids([child.pid], tmp_path)
        assert target.read_text() == "64"
        assert f"write {target} <- 64" in caplog.text
        assert f"SIGKILL [{child.pid}] in {tmp_path}" in caplog.text
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()
    assert wait_gone(child.pid)


def test_unreadable_counters_are_none_and_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sandboxrun.cgroup"):
        usage = read_usage(tmp_path / "gone", None)
    assert usage.peak_memory_bytes is None  # not 0: the result must not claim 0 GiB
    assert "cannot read the counters" in caplog.text


def test_counters_are_read_verbatim(tmp_path):
    (tmp_path / "memory.peak").write_text("123456\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (tmp_path / "pids.events").write_text("max 2\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    usage = read_usage(tmp_path, None)
    assert (usage.peak_memory_bytes, usage.oom_killed, usage.process_limit_hit) == (
        123456,
        True,
        True,
    )
    assert usage.cpu_time_seconds == 1.5
    (tmp_path / "memory.events").write_text("max 0\noom 0\noom_kill 0\noom_group_kill 1\n")
    (tmp_path / "pids.events").write_text("max 0\n")
    usage = read_usage(tmp_path, 999)  # a sampled peak (no memory.peak before 5.19)
    assert (usage.peak_memory_bytes, usage.oom_killed, usage.process_limit_hit) == (
        999,
        True,
        False,
    )


# ---------------------------------------------------------------- what the instance knows


def test_no_memory_peak_is_not_kernel_enforced(tmp_path):
    mount, root = tmp_path, tmp_path / "delegated"
    root.mkdir()
    (root / "memory.max").write_text("max\n")  # a 5.15 cgroup: no memory.peak
    (root / "cgroup.kill").write_text("")
    place = v2place.Place(mount, root, move_self=False)
    assert probe_files(place, None)["memory.peak"] is False
    session = RunnerSession(place)
    assert session.kernel_enforced == KERNEL_ENFORCED - {"peak_memory"}
    assert "degraded" in str(session.details()["peak_memory"])
    (root / "memory.peak").write_text("0\n")
    assert RunnerSession(place).kernel_enforced == KERNEL_ENFORCED


def test_kernel_versions():
    assert kernel_at_least(5, 19, "6.18.44-fc-v1045")
    assert kernel_at_least(5, 14, "5.15.0-91-generic")
    assert not kernel_at_least(5, 19, "5.15.0-91-generic")
    assert not kernel_at_least(4, 19, "weird")


class _Options(Backend):
    name = "test"

    def __init__(self, alpha: int = 1, *, beta: str = "b") -> None:
        gamma = alpha * 2  # a local: co_varnames would let an option called "gamma" in
        self.values = (alpha, beta, gamma)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def sandbox(self, limits: object) -> Sandbox:  # type: ignore[override]
        raise NotImplementedError


def test_options_are_filtered_by_the_signature():
    options = {"alpha": 3, "beta": "x", "gamma": 9, "poll_interval_seconds": 0.1}
    assert accepted_options(_Options, options) == {"alpha": 3, "beta": "x"}
    assert _Options(**accepted_options(_Options, options)).values == (3, "x", 6)


def test_detect_reports_what_the_instance_knows(monkeypatch):
    from sandboxrun._backends import detect
    from sandboxrun._backends.psutil_monitor import PsutilBackend

    degraded = property(lambda self: frozenset({"peak_memory"}))
    monkeypatch.setattr(PsutilBackend, "kernel_enforced", degraded)
    assert detect()["backends"]["psutil"]["kernel_enforced"] == ["peak_memory"]
