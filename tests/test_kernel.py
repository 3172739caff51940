"""Cases only a kernel-enforcing backend can pass (cgroup v1 here, cgroup v2 in the guest)."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import signal
import threading
import time

import pytest

from sandboxrun import ProcessLimitExceeded, ProcessManager, Task, WorkerDied, detect
from sandboxrun._launch import ZYGOTE_AVAILABLE
from sandboxrun._limits import DEFAULT_MAX_PROCESSES

from . import tasks
from .conftest import SCALE, leftover_cgroups

GIB = 1024**3
SLOT_OVERHEAD_PROCESSES = 2  # sandboxrun/_backends/cgroup_v1_slot.py (importable on Linux only)
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


@pytest.mark.parametrize("start_method", ["zygote", "fork"])
def test_default_process_limit_stops_a_thread_bomb(kernel_backend, start_method):
    # No max_processes given: the default holds. 2000 sleeping threads asked for, at most the
    # default at once (the task's main thread included), then "can't start new thread".
    if start_method == "zygote" and not ZYGOTE_AVAILABLE:
        pytest.skip("no zygote launcher here")
    isolation = None if start_method == "zygote" else "none"  # only the zygote isolates
    result = run(kernel_backend, tasks.start_threads, 2000, 30, start_method=start_method,
                 worker_timeout_seconds=60 * SCALE, isolation=isolation)  # fmt: skip
    assert not result.success and result.process_limit_exceeded, result
    assert not result.timed_out and not result.out_of_memory
    assert isinstance(result.exception, ProcessLimitExceeded), result
    assert f"max_processes={DEFAULT_MAX_PROCESSES}" in str(result.exception)
    refused = result.exception.__cause__  # what the task raised: how many ran at once
    assert isinstance(refused, RuntimeError) and "can't start new thread" in str(refused)
    running = int(re.match(r"(\d+) threads running", str(refused)).group(1))
    assert DEFAULT_MAX_PROCESSES - 64 < running < DEFAULT_MAX_PROCESSES, running


def test_max_processes_zero_means_no_limit(kernel_backend):
    result = run(kernel_backend, tasks.start_threads, 2000, 30, max_processes=0)
    assert result.success and result.result == 2000, result
    assert not result.process_limit_exceeded


def test_killed_by_hand_is_not_out_of_memory(kernel_backend, tmp_path):
    pid_file = tmp_path / "pid"

    def killer():
        deadline = time.monotonic() + 20 * SCALE
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                os.kill(tasks.read_pid(pid_file), signal.SIGKILL)
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
        runner_dirs = [str(p) for p in manager.backend.runner_dirs]
        assert runner_dirs
        for path in runner_dirs:
            assert f"sandboxrun-{os.getpid()}-" in path
            relative = path.split("/sys/fs/cgroup/", 1)[1].split("/", 1)[-1]
            parent = "/" + relative.rsplit("/", 1)[0] if "/" in relative else "/"
            assert parent in own or os.environ.get("SANDBOXRUN_CGROUP_ROOT", "\0") in path
    finally:
        manager.backend.close()
    assert not leftover_cgroups()


def _writable_v1_memory_cgroup() -> bool:
    """Independent of sandboxrun: is this process's v1 memory cgroup a place we may write?"""
    own = {}
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own.update({name: path for name in controllers.split(",")})
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        kind, _, options = [*tail.split(), "", "", ""][:3]
        if kind == "cgroup" and "memory" in options.split(",") and "memory" in own:
            directory = fields.split()[4].replace("\\040", " ") + own["memory"]
            return os.access(directory, os.W_OK)
    return False


def test_auto_picks_a_kernel_backend_when_one_works():
    report = detect()
    assert ProcessManager().backend.name == report["chosen"]
    expected = os.environ.get("SANDBOXRUN_EXPECT_BACKEND")  # set by scripts/vm-test.sh
    if expected:
        assert report["chosen"] == expected
    elif os.geteuid() == 0 and _writable_v1_memory_cgroup():
        # A writable v1 memory hierarchy as root: cgroup_v1 works, so auto must not poll.
        assert report["chosen"] in ("cgroup_v2", "systemd", "cgroup_v1"), report
        assert report["backends"]["cgroup_v1"]["available"], report["backends"]["cgroup_v1"]
    else:
        pytest.skip("no SANDBOXRUN_EXPECT_BACKEND and no independent fact to check against")


def test_no_cgroup_left_behind(kernel_backend):
    # Its own manager, whatever ran before: the runner dirs it made are gone after the block.
    made: list[pathlib.Path] = []
    with ProcessManager(2, backend=kernel_backend, max_processes=20) as manager:
        for index in range(3):
            manager.queue_task(Task(tasks.double, (index,)))
        for result in manager.as_completed():
            made += [d for d in manager.backend.runner_dirs if d not in made]
            assert result.success
    assert made and all(f"sandboxrun-{os.getpid()}-" in d.name for d in made)
    assert [d for d in made if d.exists()] == []
    assert not (set(leftover_cgroups()) & {str(d) for d in made})


def test_fork_bomb_that_gives_up_is_a_process_limit_failure(kernel_backend):
    result = run(kernel_backend, tasks.fork_or_fail, 20, max_processes=5)
    assert not result.success and result.process_limit_exceeded
    assert not result.out_of_memory and not result.timed_out


def test_cgroupfs_writes_and_the_kill_are_logged(kernel_backend, caplog):
    # The verbose trace (like isolate's or BenchExec's): each limit written, then the kill.
    with caplog.at_level(logging.DEBUG, logger="sandboxrun"):
        result = run(
            kernel_backend,
            tasks.sleep_then,
            60,
            memory_limit_in_gib=0.25,
            max_processes=20,
            worker_timeout_seconds=1 * SCALE,
        )
    assert result.timed_out
    text = caplog.text
    # A reused per-slot cgroup (cgroup_v1 under the zygote, see cgroup_v1_slot) also holds the
    # zygote and the task's PID 1 (+2 processes) and what the zygote has charged (the baseline,
    # added to the limit): the trace says so.
    pids_max = re.search(r"write \S+/pids\.max <- (\d+)", text)
    assert pids_max and int(pids_max.group(1)) in (20, 20 + SLOT_OVERHEAD_PROCESSES), text
    limit = re.search(r"write \S+/memory\.(?:max|limit_in_bytes) <- (\d+)", text)
    assert limit and GIB // 4 <= int(limit.group(1)) <= GIB // 4 + 64 * 2**20, text
    if int(limit.group(1)) != GIB // 4:
        assert re.search(r"baseline \d+ bytes", text), text
    assert re.search(r"write \S+/cgroup\.kill <- 1|SIGKILL \[\d+", text), text
