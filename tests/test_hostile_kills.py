"""Kills a hostile task cannot dodge (issue 10, points 4, 5, 6, 10, 11), on every backend here.

In each test the other tasks of the same batch must return their correct results.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxrun import ProcessManager, Task, TaskResult
from sandboxrun._backends import cgroupfs

from . import tasks
from .conftest import AVAILABLE, SCALE, gone, leftover_cgroups, wait_gone, wait_until

BENIGN = [3, 5, 8, 13]


def double(value: int) -> int:
    return value * 2


def _v1_dirs(pid: int | str = "self") -> dict[str, Path]:
    """{v1 controller list: cgroup directory} of ``pid``, for the hierarchies we use."""
    points: dict[str, Path] = {}
    for fstype, point, options in cgroupfs.mounts():
        if fstype == "cgroup":
            for key in ("memory", "pids", "freezer", "cpu", "cpuacct"):
                if key in options:
                    points.setdefault(key, point)
    found: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        point = next((p for k, p in points.items() if k in controllers.split(",")), None)
        if point is not None:
            found[controllers] = point / path.lstrip("/")
    return found


def _escape(own: dict[str, str], marker: Path) -> None:
    """Move this process into the parent of its task cgroup, in every v1 hierarchy -- but only
    where that parent is strictly inside the manager's own cgroup (``own``: its directories).
    Writes the directories it moved to into ``marker``."""
    moved = []
    for controllers, directory in _v1_dirs().items():
        parent, mine = directory.parent, Path(own.get(controllers, "/nonexistent"))
        if parent != mine and mine in parent.parents and parent.name.startswith("sandboxrun-"):
            (parent / "cgroup.procs").write_text(str(os.getpid()))
            moved.append(str(parent))
    marker.write_text("\n".join(moved))


def escaped_sleeper(own: dict[str, str], marker: Path) -> None:
    _escape(own, marker)
    time.sleep(60)


def _park_child(move: Callable[[], None], pid_file: Path) -> None:
    """Fork a child that runs ``move``, writes its pid into ``pid_file`` and sleeps; return
    once it has written."""
    if os.fork() == 0:
        try:
            move()
            pid_file.write_text(str(tasks.host_pid()))
            time.sleep(60)
        finally:
            os._exit(0)
    while not pid_file.exists():
        time.sleep(0.005)


def escaping_grandchild(own: dict[str, str], marker: Path, pid_file: Path) -> int:
    _park_child(lambda: _escape(own, marker), pid_file)
    return 7


def _batch(backend: str, hostile: Task, **limits: object) -> tuple[TaskResult, list[TaskResult]]:
    with ProcessManager(len(BENIGN) + 1, backend=backend, **limits) as manager:  # type: ignore[arg-type]
        manager.queue_task(hostile)
        for value in BENIGN:
            manager.queue_task(Task(double, (value,)))
    results = manager.task_results
    assert len(results) == len(BENIGN) + 1
    by_task = {id(result.task): result for result in results}
    others = [r for r in results if r.task is not hostile]
    assert sorted(r.result for r in others) == [v * 2 for v in BENIGN]
    assert all(r.success for r in others)
    return by_task[id(hostile)], others


def _own() -> dict[str, str]:
    return {key: str(path) for key, path in _v1_dirs().items()}


# ------------------------------------------------------------------ point 4: escaped processes
# The escapes below are what isolation now stops (tests/test_isolation.py): these tests run with
# isolation="none" to prove the kill path still copes with an escape that did happen.


def test_escaped_sleeper_is_killed_at_its_timeout(backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "moved"
    hostile = Task(escaped_sleeper, (_own(), marker))
    started = time.monotonic()
    result, _ = _batch(backend, hostile, worker_timeout_seconds=2, isolation="none")
    elapsed = time.monotonic() - started
    if backend == "cgroup_v1":
        assert marker.read_text(), "the task did not leave its cgroup: the test proves nothing"
    assert result.timed_out
    assert result.exit_code == -9
    assert result.elapsed_time < 2 + 0.1 + 0.4 * SCALE, result.elapsed_time
    # From the hostile task's start (the slots' zygotes start before it, not counted) to the end.
    assert time.time() - result.start_time < 5 * SCALE, elapsed
    assert not leftover_cgroups()


def test_escaped_grandchild_dies_with_its_task(backend: str, tmp_path: Path) -> None:
    marker, pid_file = tmp_path / "moved", tmp_path / "pid"
    hostile = Task(escaping_grandchild, (_own(), marker, pid_file))
    result, _ = _batch(backend, hostile, worker_timeout_seconds=30, isolation="none")
    assert time.time() - result.start_time < 5 * SCALE, "the manager waited on the escaped child"
    if backend == "cgroup_v1":
        assert marker.read_text(), "the child did not leave its cgroup: the test proves nothing"
    assert result.success and result.result == 7
    assert wait_gone(tasks.read_pid(pid_file), 1.0), "the escaped grandchild outlived its task"
    assert not leftover_cgroups()


# ------------------------------------------------------------------ point 5: v1 sub-cgroups


def sub_cgroup_parker(pid_file: Path) -> int:
    subs = []
    for controllers, directory in _v1_dirs().items():
        # Only inside a sandbox of ours: never in the manager's own cgroup (born in place, a
        # task has no freezer cgroup of its own).
        if set(controllers.split(",")) & {"memory", "pids", "freezer"} and "sandboxrun-" in str(
            directory
        ):
            sub = directory / "hostile-sub"
            sub.mkdir()
            nested = sub / "deeper"
            nested.mkdir()
            subs.append(nested)

    def move() -> None:
        for sub in subs:
            (sub / "cgroup.procs").write_text(str(os.getpid()))

    _park_child(move, pid_file)
    return 1


@pytest.mark.skipif("cgroup_v1" not in AVAILABLE, reason="needs the cgroup v1 backend")
def test_sub_cgroup_with_a_parked_child_fails_nothing(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hostile = Task(sub_cgroup_parker, (pid_file,))
    result, _ = _batch("cgroup_v1", hostile, worker_timeout_seconds=30, isolation="none")
    assert time.time() - result.start_time < 5 * SCALE  # zygote start-up not counted
    assert result.success and result.result == 1
    assert gone(tasks.read_pid(pid_file))
    assert not leftover_cgroups()
    assert not cgroupfs.LEFTOVERS.paths()


# ------------------------------------------------------------------ point 6: no blocking kill


def sigterm_ignoring_family(count: int, ready: Path) -> None:
    for _ in range(count):
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(60)
            os._exit(0)
    ready.write_text("up")
    time.sleep(60)


def test_killing_50_grandchildren_keeps_a_neighbours_clock(backend: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    interval = 0.05
    # Long enough for the 50 forks to happen first (an emulated guest needs more than 1 s).
    timeout = max(1.0, SCALE / 10)
    with ProcessManager(
        2, backend=backend, worker_timeout_seconds=timeout, poll_interval_seconds=interval
    ) as manager:
        manager.queue_task(Task(sigterm_ignoring_family, (50, ready)))
        manager.queue_task(Task(time.sleep, (60,)))
    results = manager.task_results
    family, neighbour = results if results[0].task.func is not time.sleep else results[::-1]
    assert ready.exists(), "the 50 grandchildren were never all started"
    assert family.timed_out and neighbour.timed_out
    # Blocking the loop on the 50 kills put the neighbour's kill at 2.6-3.0 s; the margin (not
    # the 20 ms goal, which the benchmark measures) keeps a loaded 2-core CI machine from flaking.
    assert neighbour.elapsed_time < timeout + 2 * interval + 0.5 * SCALE, neighbour.elapsed_time
    assert not leftover_cgroups()


# ------------------------------------------------------------------ point 10: one max_processes


def threads(count: int) -> int:
    release = threading.Event()
    started = []
    try:
        for _ in range(count):
            thread = threading.Thread(target=release.wait)
            thread.start()
            started.append(thread)
        time.sleep(0.5)  # long enough for several polls of the psutil backend
    finally:
        release.set()
        for thread in started:
            thread.join()
    return len(started)


@pytest.mark.parametrize(("count", "exceeded"), [(500, True), (32, False)])
def test_max_processes_counts_threads_on_every_backend(
    backend: str, count: int, exceeded: bool
) -> None:
    result, _ = _batch(
        backend, Task(threads, (count,)), max_processes=64, worker_timeout_seconds=30
    )
    assert result.process_limit_exceeded is exceeded, result
    assert result.success is not exceeded
    if not exceeded:
        assert result.result == count


# ------------------------------------------------------------------ point 11: Ctrl-C at launch

_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from sandboxrun import ProcessManager, Task
    from sandboxrun._backends import create_backend

    def write_marker(path):
        open(path, "w").write("ran")  # first thing
        time.sleep(0.3)
        open(path, "a").write(" and finished")

    backend = create_backend(sys.argv[1])

    def interrupting(make):  # the zygote asks for slot_sandbox, the other launchers sandbox
        def sandbox(limits):
            box = make(limits)
            def attach(pid):  # right after launch() returned: the worker is starting up
                raise KeyboardInterrupt
            box.attach = attach
            return box
        return sandbox

    backend.sandbox = interrupting(backend.sandbox)
    backend.slot_sandbox = interrupting(backend.slot_sandbox)
    started = time.monotonic()
    try:
        with ProcessManager(2, backend=backend, worker_timeout_seconds=30) as pm:
            pm.queue_task(Task(write_marker, (sys.argv[2],)))
            pm.queue_task(Task(write_marker, (sys.argv[2] + "2",)))
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic() - started:.3f}")
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_at_a_launch_stops_the_worker(backend: str, tmp_path: Path, attempt: int) -> None:
    marker = tmp_path / "marker"
    run = subprocess.run(
        [sys.executable, "-c", _CTRL_C_SCRIPT, backend, str(marker)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("interrupted"), run.stdout + run.stderr
    assert float(run.stdout.split()[1]) < 1.0 * SCALE, run.stdout
    time.sleep(0.6)  # a worker that survived would have finished by now
    for written in (marker, Path(f"{marker}2")):
        # Under fork no backend makes the worker wait for a go frame (it enters its cgroups
        # itself), so it may have begun its task before the abort: the abort's kill by pid ends
        # it there. Before, the abort found the cgroup empty and waited: "ran and finished".
        assert not written.exists() or written.read_text() == "ran", written.read_text()
    assert wait_until(lambda: not leftover_cgroups(), 2)
