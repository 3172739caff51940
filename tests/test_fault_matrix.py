"""The fault matrix: every way a task can end, on every backend that works here.

Each case asserts the exact classification and that no process of the task is left.
"""

from __future__ import annotations

import os
import pathlib
import platform
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandboxrun import (
    ExceptionNotPicklable,
    ProcessManager,
    RemoteTraceback,
    ResultNotPicklable,
    ResultTransferError,
    Task,
    TaskResult,
    WorkerDied,
)

from . import tasks
from .conftest import (
    SCALE,
    cgroup_dirs,
    descendants,
    gone,
    leftover_cgroups,
    new_descendants,
    wait_gone,
    wait_until,
)

MIB = 1024 * 1024


def run_one(backend: str, func: Callable[..., Any], *args: Any, **limits: Any) -> TaskResult:
    with ProcessManager(1, backend=backend, **limits) as manager:
        manager.queue_task(Task(func, args))
    assert len(manager.task_results) == 1
    result = manager.task_results[0]
    assert result.backend == backend
    assert result.exit_code is not None
    assert result.end_time >= result.start_time
    assert result.elapsed_time == pytest.approx(result.end_time - result.start_time)
    if not result.success:
        assert result.exception is not None
    assert not leftover_cgroups()
    return result


def test_leftover_check_sees_a_running_tasks_cgroups(kernel_backend: str, tmp_path: Path) -> None:
    """leftover_cgroups(), which the other tests trust to find what a backend left behind, does
    find the cgroups of a running task: read from /proc/PID/cgroup, not from their names."""
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    seen: dict[str, list[Path]] = {}

    def inspect() -> None:
        try:
            if wait_until(pid_file.exists, 30):
                pid = tasks.read_pid(pid_file)
                own = cgroup_dirs()
                seen["task"] = [d for h, d in cgroup_dirs(pid).items() if d != own.get(h)]
                seen["leftovers"] = [pathlib.Path(p) for p in leftover_cgroups()]
        finally:
            release.write_text("go")

    inspector = threading.Thread(target=inspect)
    inspector.start()
    with ProcessManager(1, backend=kernel_backend, worker_timeout_seconds=60 * SCALE) as pm:
        pm.queue_task(Task(tasks.wait_for_file, (str(pid_file), str(release), 30 * SCALE)))
    inspector.join()
    assert pm.task_results[0].success, pm.task_results[0].exception
    task_dirs, leftovers = seen["task"], seen["leftovers"]
    assert task_dirs, "the task ran in no cgroup of its own"
    for directory in task_dirs:
        assert any(p == directory or p in directory.parents for p in leftovers), (
            directory,
            leftovers,
        )
        assert not directory.exists()
    assert not leftover_cgroups()


def test_normal_return(backend: str) -> None:
    result = run_one(backend, tasks.double, 21)
    assert (result.success, result.result, result.exception, result.exit_code) == (
        True,
        42,
        None,
        0,
    )
    assert not result.timed_out and not result.out_of_memory
    assert result.max_memory_used_in_gib > 0  # filled without a limit too
    assert result.timeout_seconds is None and result.memory_limit_in_gib is None


def test_file_to_file_and_file_to_memory(backend: str, tmp_path: Path) -> None:
    inputs = []
    for index in range(4):
        path = tmp_path / f"in-{index}.txt"
        path.write_bytes(b"hello %d" % index)
        inputs.append(path)
    with ProcessManager(
        2, worker_timeout_seconds=30 * SCALE, memory_limit_in_gib=1, backend=backend
    ) as pm:
        for path in inputs:
            pm.queue_task(
                Task(
                    tasks.convert_file,
                    kwargs={"input_file": str(path), "output_file": str(path) + ".out"},
                )
            )
            pm.queue_task(Task(tasks.file_to_memory, kwargs={"input_file": str(path)}))
    assert len(pm.task_results) == 8
    assert all(r.success for r in pm.task_results)
    for path in inputs:
        assert pathlib.Path(str(path) + ".out").read_bytes() == path.read_bytes().upper()
    in_memory = sorted(r.result for r in pm.task_results if r.result is not None)
    assert in_memory == sorted(p.read_bytes().upper() for p in inputs)
    assert all(
        r.timeout_seconds == 30 * SCALE and r.memory_limit_in_gib == 1 for r in pm.task_results
    )


def test_as_completed_streams_results(backend: str) -> None:
    with ProcessManager(2, backend=backend) as pm:
        pm.queue_task(Task(tasks.sleep_then, (3 * SCALE, "slow")))
        pm.queue_task(Task(tasks.sleep_then, (0, "fast")))
        started = time.monotonic()
        seen = []
        for result in pm.as_completed():
            seen.append((result.result, time.monotonic() - started))
    assert [value for value, _ in seen] == ["fast", "slow"]
    assert seen[0][1] < 2.5 * SCALE  # the fast one did not wait for the slow one
    assert pm.task_results == []  # as the seed documents


def test_leaving_as_completed_early_loses_nothing(backend: str) -> None:
    with ProcessManager(2, backend=backend) as pm:
        for index in range(6):
            pm.queue_task(Task(tasks.identity, (index,)))
        first = next(iter(pm.as_completed()))
    assert len(pm.task_results) == 5
    assert sorted([first.result, *(r.result for r in pm.task_results)]) == list(range(6))


def test_300_tiny_tasks_each_reported_once(backend: str) -> None:
    with ProcessManager(2, backend=backend) as pm:
        for index in range(300):
            pm.queue_task(Task(tasks.pid_and_value, (index,)))
    values = [r.result[1] for r in pm.task_results]
    assert sorted(values) == list(range(300))
    pids = {r.result[0] for r in pm.task_results}
    assert os.getpid() not in pids
    assert len(pids) >= 290  # a fresh process per task (pids may recycle, rarely)


def test_max_workers_never_exceeded(backend: str, tmp_path: Path) -> None:
    with ProcessManager(3, backend=backend) as pm:
        for _ in range(12):
            pm.queue_task(Task(tasks.record_interval, (str(tmp_path), 0.15 * SCALE)))
    assert all(r.success for r in pm.task_results)
    events = []
    for path in tmp_path.iterdir():
        start, end = map(float, path.read_text().split())
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, delta in sorted(events, key=lambda event: (event[0], event[1])):
        running += delta
        peak = max(peak, running)
    assert peak == 3


def test_exception_in_task(backend: str) -> None:
    result = run_one(backend, tasks.raise_value_error, "broken input")
    assert not result.success and result.exit_code == 0
    assert type(result.exception) is ValueError and str(result.exception) == "broken input"
    assert isinstance(result.exception.__cause__, RemoteTraceback)
    assert "raise_value_error" in str(result.exception.__cause__)


def test_unpicklable_result(backend: str) -> None:
    result = run_one(backend, tasks.return_lambda)
    assert not result.success and result.result is None
    assert isinstance(result.exception, ResultNotPicklable)
    assert "function" in result.exception.type_name


def test_exception_that_cannot_be_pickled(backend: str) -> None:
    result = run_one(backend, tasks.raise_unpicklable_exception)
    assert not result.success
    assert isinstance(result.exception, ExceptionNotPicklable)
    assert result.exception.type_name.endswith("NeedsTwoArgs")
    assert result.exception.text == "left/right"
    assert "raise_unpicklable_exception" in result.exception.traceback_text


def test_os_exit(backend: str) -> None:
    result = run_one(backend, tasks.exit_hard, 3)
    assert (result.success, result.exit_code, result.timed_out, result.out_of_memory) == (
        False,
        3,
        False,
        False,
    )
    assert isinstance(result.exception, WorkerDied)
    assert "code 3" in str(result.exception)


def test_sys_exit(backend: str) -> None:
    result = run_one(backend, tasks.sys_exit, 4)
    assert (result.success, result.exit_code) == (False, 4)
    assert isinstance(result.exception, SystemExit) and result.exception.code == 4


def test_self_sigkill_is_not_out_of_memory(backend: str) -> None:
    result = run_one(backend, tasks.kill_self, memory_limit_in_gib=1)
    assert (result.success, result.exit_code, result.out_of_memory, result.timed_out) == (
        False,
        -9,
        False,
        False,
    )
    assert isinstance(result.exception, WorkerDied) and "SIGKILL" in str(result.exception)


def test_segfault(backend: str) -> None:
    result = run_one(backend, tasks.segfault)
    assert (result.success, result.exit_code) == (False, -signal.SIGSEGV)
    assert isinstance(result.exception, WorkerDied) and "SIGSEGV" in str(result.exception)


def test_sleep_past_timeout(backend: str) -> None:
    started = time.monotonic()
    result = run_one(backend, tasks.sleep_then, 60, worker_timeout_seconds=0.5 * SCALE)
    assert time.monotonic() - started < 30 * SCALE
    assert (result.success, result.timed_out, result.exit_code, result.out_of_memory) == (
        False,
        True,
        -9,
        False,
    )
    assert isinstance(result.exception, TimeoutError)
    assert result.elapsed_time >= 0.5 * SCALE


def test_ignoring_sigterm_past_timeout(backend: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_one(
        backend,
        tasks.ignore_sigterm_and_sleep,
        str(pid_file),
        60,
        worker_timeout_seconds=0.5 * SCALE,
    )
    assert result.timed_out and isinstance(result.exception, TimeoutError)
    assert gone(tasks.read_pid(pid_file))


def test_grandchild_left_running_is_killed(backend: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_one(backend, tasks.spawn_grandchild, str(pid_file))
    assert result.success
    assert wait_gone(tasks.resolve_pid(result.result))


def test_grandchild_of_a_timed_out_task_is_killed(backend: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_one(
        backend, tasks.spawn_grandchild, str(pid_file), 60, worker_timeout_seconds=1 * SCALE
    )
    assert result.timed_out
    assert wait_gone(tasks.read_pid(pid_file))


def test_double_forked_orphan_is_killed(backend: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_one(backend, tasks.fork_grandchild_and_exit, str(pid_file))
    assert result.success
    assert wait_gone(tasks.read_pid(pid_file))


def test_256_mib_result_arrives_intact(backend: str) -> None:
    size = 256 * MIB
    result = run_one(backend, tasks.big_result, size)
    assert result.success
    assert len(result.result) == size and result.result.count(b"x") == size


def test_stdout_flood(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    result = run_one(backend, tasks.flood_stdout, 32)
    assert result.success and result.result == "done"
    out, _ = capfd.readouterr()
    assert len(out) >= 32 * MIB


def test_memory_over_the_limit(backend: str) -> None:
    result = run_one(backend, tasks.allocate, 16, 64, 0.02, memory_limit_in_gib=0.25)
    assert (result.success, result.out_of_memory, result.timed_out) == (False, True, False)
    assert isinstance(result.exception, MemoryError)
    assert result.max_memory_used_in_gib >= 0.2


def test_cpu_time_limit(backend: str) -> None:
    result = run_one(backend, tasks.burn_cpu, 30, cpu_time_limit_seconds=1)
    assert (result.success, result.cpu_time_limit_exceeded, result.timed_out) == (
        False,
        True,
        False,
    )
    assert isinstance(result.exception, TimeoutError)
    assert result.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)


def test_fork_bomb_is_contained(backend: str) -> None:
    result = run_one(
        backend, tasks.fork_bomb, 3 * SCALE, max_processes=30, worker_timeout_seconds=20 * SCALE
    )
    polled = result.backend == "psutil"
    if polled and (result.isolation == "none" or result.process_limit_exceeded):
        # killed when seen; under a profile RLIMIT_NPROC of the task's uid refuses the forks
        # first, unless a poll saw the tree (its PID 1 counted too) over the limit before
        assert result.process_limit_exceeded and not result.success
    else:  # pids.max, or RLIMIT_NPROC of the task's own uid (psutil under a profile)
        assert result.success  # the kernel refused the forks; the task went on
        # ...and refused them at the limit: every child sleeps past the loop's end, so all it
        # forked were alive at once, next to the task itself (without a limit: thousands).
        assert 0 < result.result < 30, result.result
    after = run_one(backend, tasks.double, 1)
    assert after.success and after.result == 2


def test_keyboard_interrupt_in_with_body_kills_and_drops(backend: str, tmp_path: Path) -> None:
    # Issue 13: only a non-Exception (Ctrl-C) kills and drops now; an Exception lets the queued
    # work finish first (tests/test_glasswall_manager.py).
    marker = tmp_path / "ran"
    pid_file = tmp_path / "pid"
    before = descendants()
    with pytest.raises(KeyboardInterrupt), ProcessManager(2, backend=backend) as pm:
        pm.queue_task(Task(tasks.identity, (1,)))
        pm.queue_task(Task(tasks.ignore_sigterm_and_sleep, (str(pid_file), 60)))
        pm.queue_task(Task(tasks.touch_after, (str(marker), 0)))
        for _ in pm.as_completed():  # the first result: the SIGTERM-ignorer is running
            wait_until(pid_file.exists, 10)
            raise KeyboardInterrupt("boom")
    assert pid_file.exists() and wait_gone(tasks.read_pid(pid_file))
    # Every process the manager started must end; once none is left, nothing can still write
    # the marker, so its absence is final (not just "not yet").
    assert wait_until(lambda: not new_descendants(before), 10), new_descendants(before)
    assert not marker.exists()  # the queued task was dropped, not run
    assert pm.task_results == []
    with pytest.raises(RuntimeError):
        pm.queue_task(Task(tasks.double, (1,)))
    assert not leftover_cgroups()


def test_parent_is_idle_while_tasks_sleep(backend: str) -> None:
    me = psutil.Process()
    before = sum(me.cpu_times()[:2])
    with ProcessManager(2, backend=backend, poll_interval_seconds=0.1) as pm:
        pm.queue_task(Task(tasks.sleep_then, (2,)))
        pm.queue_task(Task(tasks.sleep_then, (2,)))
    used = sum(me.cpu_times()[:2]) - before
    # A busy loop would burn ~2 s here; an event loop uses milliseconds (polling a little more,
    # and every poll costs 20-35x more in an emulated guest).
    assert used < 0.6 * max(1.0, SCALE / 4), used


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="needs the write syscall number"
)
def test_worker_killed_mid_write_is_a_failed_result(backend: str) -> None:
    result = run_one(backend, tasks.killed_while_sending_result, 256 * MIB)
    assert (result.success, result.result, result.exit_code) == (False, None, -9)
    assert isinstance(result.exception, WorkerDied)
    assert "cut off mid-write" in str(result.exception)
    assert isinstance(result.exception.__cause__, ResultTransferError)
