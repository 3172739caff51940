"""The public API: the seed's contract, the validation, the start methods."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import sandboxrun
from sandboxrun import BackendUnavailable, ProcessManager, Task, TaskResult

from . import tasks
from .conftest import cgroup_dirs, wait_until

SEED_FIELDS = [
    "task", "success", "result", "exception", "exit_code", "timeout_seconds",
    "memory_limit_in_gib", "start_time", "end_time", "elapsed_time", "timed_out",
    "max_memory_used_in_gib", "out_of_memory",
]  # fmt: skip


def test_task_result_starts_with_the_13_seed_fields() -> None:
    names = [field.name for field in dataclasses.fields(TaskResult)]
    assert names[:13] == SEED_FIELDS


def test_glasswall_name_is_an_alias() -> None:
    assert sandboxrun.GlasswallProcessManager is ProcessManager


def test_isolation_is_public_and_still_imported_lazily() -> None:
    # Docs and error messages name sandboxrun.Isolation; importing sandboxrun alone must not
    # load the isolation package (every module the package imports costs each zygote fork).
    from sandboxrun import Isolation
    from sandboxrun._isolation import Isolation as defined

    assert Isolation is defined
    assert "Isolation" in sandboxrun.__all__ and "Isolation" in dir(sandboxrun)
    assert Isolation(private_network=True).private_network
    code = (
        "import sys, sandboxrun; assert 'sandboxrun._isolation' not in sys.modules;"
        " from sandboxrun import Isolation; assert 'sandboxrun._isolation' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_task_validation() -> None:
    with pytest.raises(TypeError, match="callable"):
        Task("not a function")  # type: ignore[arg-type]  # the point: refused at run time
    with pytest.raises(TypeError, match="args"):
        Task(print, args="abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kwargs"):
        Task(print, kwargs=[1])  # type: ignore[arg-type]
    task = Task(print)
    assert task.args == () and task.kwargs == {}


def test_task_equality_hash_and_repr() -> None:
    a = Task(tasks.double, (1,), {"x": "y"})
    b = Task(tasks.double, [1], {"x": "y"})
    assert a == b and hash(a) == hash(b)
    assert a != Task(tasks.double, (2,), {"x": "y"})
    assert len({a, b}) == 1
    assert hash(Task(tasks.identity, ([1, 2],))) == hash(Task(tasks.identity, ([1, 2],)))
    long = Task(tasks.identity, kwargs={"input_file": "C:\\gwpw\\input\\" + "a" * 300})
    text = repr(long)
    assert text.startswith("Task(func=identity, args=(), kwargs=(input_file='C:")
    assert "..." in text and len(text) < 200
    assert pickle.loads(pickle.dumps(a)) == a


def test_task_result_repr_is_truncated_and_eq_follows_the_seed() -> None:
    big = TaskResult(task=Task(tasks.identity), success=True, result=b"x" * 10_000)
    assert "..." in repr(big) and len(repr(big)) < 2000
    other = TaskResult(task=Task(tasks.identity), success=True, result=b"x" * 10_000, exit_code=5)
    assert big == other  # task, success, result, exception: like the seed


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_workers": -1}, ValueError),
        ({"max_workers": 1.5}, TypeError),
        ({"max_workers": True}, TypeError),
        ({"worker_timeout_seconds": -1}, ValueError),
        ({"worker_timeout_seconds": float("nan")}, ValueError),
        ({"worker_timeout_seconds": "5"}, TypeError),
        ({"memory_limit_in_gib": -2}, ValueError),
        ({"memory_limit_in_gib": 1e-12}, ValueError),
        ({"cpu_time_limit_seconds": 0}, ValueError),
        ({"max_processes": -1}, ValueError),
        ({"max_processes": 2.5}, TypeError),
        ({"backend": "nope"}, ValueError),
        ({"start_method": "teleport"}, ValueError),
        ({"poll_interval_seconds": 0}, ValueError),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        ProcessManager(**kwargs)


def _quota(directory: Path, hierarchy: str) -> float | None:
    """The CPU quota set on one cgroup directory, in CPUs; None when there is none."""
    try:
        if hierarchy == "":
            limit, period = (directory / "cpu.max").read_text().split()
            return None if limit == "max" else int(limit) / int(period)
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def expected_cpus() -> int:
    """What the guide promises for ``max_workers=None``: the CPUs of this process's affinity,
    capped by the smallest CPU quota on the way from its cgroups up to each mount's root
    (rounded up: a quota of 1.5 CPUs keeps 2 workers busy). Worked out here from
    /proc/self/mountinfo, not with the library's own code."""
    count = len(os.sched_getaffinity(0))
    quotas = []
    for hierarchy, directory in cgroup_dirs().items():
        if hierarchy != "" and "cpu" not in hierarchy.split(","):
            continue
        mount_root = directory
        while not os.path.ismount(mount_root) and mount_root != mount_root.parent:
            mount_root = mount_root.parent
        for level in [directory, *directory.parents]:
            quota = _quota(level, hierarchy)
            if quota is not None:
                quotas.append(quota)
            if level == mount_root:
                break
    if quotas:
        count = min(count, max(1, math.ceil(min(quotas))))
    return count


def test_default_max_workers_is_the_usable_cpus() -> None:
    assert ProcessManager().max_workers == expected_cpus()


def _default_workers_in_a_child(setup: str) -> int:
    """``ProcessManager().max_workers`` in a fresh interpreter after ``setup`` ran there."""
    code = f"{setup}\nfrom sandboxrun import ProcessManager\nprint(ProcessManager().max_workers)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_default_max_workers_follows_the_affinity() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one usable CPU: a smaller affinity cannot be told apart")
    assert _default_workers_in_a_child(f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})") == 1


@pytest.mark.parametrize("quota", [0.5, 1.5])
def test_default_max_workers_follows_a_cgroup_cpu_quota(quota: float) -> None:
    """A child interpreter moves itself into a cgroup v1 ``cpu`` cgroup with a CFS quota, made
    below this process's own ``cpu`` cgroup and removed afterwards."""
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one usable CPU: a quota cannot lower the count")
    own = next((d for h, d in cgroup_dirs().items() if "cpu" in h.split(",")), None)
    if own is None:
        pytest.skip("no cgroup v1 cpu hierarchy")
    cgroup = own / f"sbtest-{os.getpid()}-cpu-quota"
    try:
        cgroup.mkdir()
    except OSError as error:
        pytest.skip(f"cannot make a cpu cgroup here: {error}")
    try:
        period = int((cgroup / "cpu.cfs_period_us").read_text())
        (cgroup / "cpu.cfs_quota_us").write_text(str(int(quota * period)))
        enter = f"open({str(cgroup / 'cgroup.procs')!r}, 'w').write('0')"
        assert _default_workers_in_a_child(enter) == min(cpus, max(1, math.ceil(quota)))
    finally:
        assert wait_until(lambda: _rmdir(cgroup), 5)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # EBUSY: the child's exit is not accounted yet
    return True


def test_queue_task_rejects_non_tasks_and_a_finished_manager_runs_again() -> None:
    # Issue 13: a finished manager is reusable, as Glasswall's is (it used to raise
    # RuntimeError here); only an aborted one refuses (tests/test_glasswall_manager.py).
    with ProcessManager(1, backend="psutil") as pm:
        with pytest.raises(TypeError):
            pm.queue_task(tasks.double)  # type: ignore[arg-type]
        pm.queue_task(Task(tasks.double, (2,)))
    assert [r.result for r in pm.task_results] == [4]
    with pm:
        pm.queue_task(Task(tasks.double, (3,)))
    assert [r.result for r in pm.task_results] == [4, 6]


def test_unsendable_task_is_refused_at_queue_time_under_spawn() -> None:
    pm = ProcessManager(1, backend="psutil", start_method="spawn", isolation="none")
    with pytest.raises(TypeError, match="cannot be sent to a worker"):
        pm.queue_task(Task(lambda: 1))
    with pytest.raises(TypeError, match="cannot be sent"):
        pm.queue_task(Task(tasks.identity, (threading.Lock(),)))


def test_lambda_is_fine_under_fork() -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork here")
    with ProcessManager(1, backend="psutil", start_method="fork", isolation="none") as pm:
        pm.queue_task(Task(lambda: 7))
    assert pm.task_results[0].result == 7


def test_unavailable_backend_is_a_clear_error() -> None:
    report = sandboxrun.detect()
    missing = [name for name, entry in report["backends"].items() if not entry["available"]]
    if not missing:
        pytest.skip("every backend works here")
    with pytest.raises(BackendUnavailable, match="cannot work here"):
        ProcessManager(backend=missing[0])


@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_start_methods(method: str, backend: str) -> None:
    with ProcessManager(2, backend=backend, start_method=method, worker_timeout_seconds=60,
                        isolation="none") as pm:
        pm.queue_task(Task(tasks.double, (5,)))
        pm.queue_task(Task(tasks.raise_value_error, ("m",)))
        pm.queue_task(Task(tasks.exit_hard, (2,)))
        pm.queue_task(Task(tasks.big_result, (8 * 1024 * 1024,)))
    by_func = {r.task.func.__name__: r for r in pm.task_results}
    assert by_func["double"].result == 10
    assert isinstance(by_func["raise_value_error"].exception, ValueError)
    assert by_func["exit_hard"].exit_code == 2
    assert len(by_func["big_result"].result) == 8 * 1024 * 1024


def test_safe_when_the_caller_has_threads(backend: str) -> None:
    stop = threading.Event()
    workers = [threading.Thread(target=stop.wait) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        with ProcessManager(2, backend=backend, start_method="forkserver", isolation="none") as pm:
            for index in range(10):
                pm.queue_task(Task(tasks.check_threads_safe, (index,)))
        assert sorted(r.result for r in pm.task_results) == sorted(sum(range(i)) for i in range(10))
    finally:
        stop.set()
        for worker in workers:
            worker.join()
