"""Cases only a kernel-enforcing backend can pass (cgroup v1 here, cgroup v2 in the guest)."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import pytest

from sandboxrun import ProcessManager, Task, WorkerDied, detect

from . import tasks
from .conftest import KERNEL_BACKENDS, SCALE, leftover_cgroups

GIB = 1024**3
MIB = 1024**2


def run(backend, func, *args, **limits):
    with ProcessManager(1, backend=backend, **limits) as manager:
        manager.queue_task(Task(func, args))
    return manager.task_results[0]


def test_fast_allocator_is_stopped_at_the_limit(kernel_backend):
    limit = 0.25
    result = run(kernel_backend, tasks.allocate, 64, 16, memory_limit_in_gib=limit)
    assert (result.success, result.out_of_memory, result.timed_out) == (False, True, False)
    assert isinstance(result.exception, MemoryError)
    assert result.exit_code == -signal.SIGKILL  # the OOM killer, not a Python MemoryError
    assert result.max_memory_used_in_gib <= limit  # the kernel never lets it above
    assert result.max_memory_used_in_gib >= limit * 0.75


def test_short_task_peak_is_not_missed(kernel_backend):
    started = time.monotonic()
    result = run(kernel_backend, tasks.allocate, 300, 1)
    assert result.success
    assert result.max_memory_used_in_gib * 1024 >= 300
    assert time.monotonic() - started < 10 * SCALE


def test_fork_bomb_under_max_processes_50(kernel_backend):
    result = run(
        kernel_backend,
        tasks.fork_bomb,
        2 * SCALE,
        max_processes=50,
        worker_timeout_seconds=30 * SCALE,
    )
    assert result.success and not result.timed_out
    assert result.result >= 40  # it did fork up to the cap, then the kernel said no
    after = run(kernel_backend, tasks.double, 21, max_processes=50)
    assert after.success and after.result == 42


def test_killed_by_hand_is_not_out_of_memory(kernel_backend, tmp_path):
    pid_file = tmp_path / "pid"

    def killer():
        deadline = time.monotonic() + 20 * SCALE
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    result = run(
        kernel_backend, tasks.ignore_sigterm_and_sleep, str(pid_file), 30, memory_limit_in_gib=0.5
    )
    thread.join()
    assert (result.success, result.exit_code, result.out_of_memory) == (False, -9, False)
    assert isinstance(result.exception, WorkerDied)


def test_memory_is_counted_for_the_whole_tree(kernel_backend):
    # A shell child allocating in a separate process still counts against the task's limit.
    result = run(
        kernel_backend,
        tasks.run_command,
        ["python3", "-c", "x = b'a' * (400 * 1024 * 1024)"],
        memory_limit_in_gib=0.25,
    )
    assert result.out_of_memory and not result.success


def test_cgroup_layout_is_inside_our_own_cgroup(kernel_backend):
    manager = ProcessManager(1, backend=kernel_backend)
    manager.backend.open()
    try:
        own = pathlib.Path("/proc/self/cgroup").read_text()
        runner_dirs = [str(p) for p in getattr(manager.backend, "runner", {}).values()] or [
            str(getattr(manager.backend, "runner_path", ""))
        ]
        for path in runner_dirs:
            assert f"sandboxrun-{os.getpid()}-" in path
            relative = path.split("/sys/fs/cgroup/", 1)[1].split("/", 1)[-1]
            parent = "/" + relative.rsplit("/", 1)[0] if "/" in relative else "/"
            assert parent in own or os.environ.get("SANDBOXRUN_CGROUP_ROOT", "\0") in path
    finally:
        manager.backend.close()
    assert not leftover_cgroups()


def test_auto_picks_a_kernel_backend_when_one_works():
    report = detect()
    expected = os.environ.get("SANDBOXRUN_EXPECT_BACKEND")
    if expected:
        assert report["chosen"] == expected
        assert ProcessManager().backend.name == expected
    if KERNEL_BACKENDS:
        assert report["chosen"] in KERNEL_BACKENDS
    else:
        pytest.skip("no kernel backend works on this machine")


def test_no_cgroup_left_behind():
    assert leftover_cgroups() == []


def test_fork_bomb_that_gives_up_is_a_process_limit_failure(kernel_backend):
    result = run(kernel_backend, tasks.fork_or_fail, 20, max_processes=5)
    assert not result.success and result.process_limit_exceeded
    assert not result.out_of_memory and not result.timed_out
