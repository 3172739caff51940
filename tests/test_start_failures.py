"""A task whose worker cannot start (its sandbox, the backend, its zygote, a memory limit too
small to start in) gets one failed TaskResult; nothing escapes the with-block or
as_completed(), its neighbours run, and the manager stays usable."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from sandboxrun import ProcessManager, SandboxrunError, Task, TaskResult
from sandboxrun._backends import create_backend
from sandboxrun._backends.base import Backend, Sandbox
from sandboxrun._launch import ZYGOTE_AVAILABLE
from sandboxrun._limits import MIN_WORKER_MEMORY_BYTES, Limits
from sandboxrun._task import LaunchHook

from . import tasks
from .conftest import SCALE

VALUES = [1, 2, 3]


def _run(manager: ProcessManager, queued: list[Task], how: str) -> list[TaskResult]:
    """The results of ``queued`` through the with-block or as_completed()."""
    if how == "with":
        with manager:
            for task in queued:
                manager.queue_task(task)
        return manager.task_results[-len(queued) :]
    with manager:
        for task in queued:
            manager.queue_task(task)
        return list(manager.as_completed())


def _doubles() -> list[Task]:
    return [Task(tasks.double, (value,)) for value in VALUES]


@pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="no zygote launcher here")
@pytest.mark.parametrize("how", ["with", "as_completed"])
def test_a_memory_limit_too_small_to_start_in_fails_each_task(
    kernel_backend: str, how: str
) -> None:
    manager = ProcessManager(
        2, 60 * SCALE, 1 / 1024, backend=kernel_backend, start_method="zygote"  # type: ignore[arg-type]
    )
    results = _run(manager, _doubles(), how)
    assert len(results) == len(VALUES)
    for result in results:
        # Either the zygote or the task's PID 1 was OOM-killed before task code: both say why.
        assert not result.success, result
        text = str(result.exception)
        assert "the memory limit 1 MiB is below what a worker needs to start" in text, text
        assert f"(~{MIN_WORKER_MEMORY_BYTES // 2**20} MiB): raise memory_limit_in_gib" in text
        assert isinstance(result.exception, (SandboxrunError, MemoryError)), result
    # Still usable: more tasks, another run, results and no RuntimeError.
    again = _run(manager, [Task(tasks.double, (9,))], how)
    assert len(again) == 1 and not again[0].success


@pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="no zygote launcher here")
@pytest.mark.parametrize("how", ["with", "as_completed"])
def test_a_zygote_that_dies_at_start_fails_its_tasks(
    backend: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandboxrun._zygote import client

    # Zygotes of a key of their own (env), so no idle one from an earlier test is reused.
    env = {"SANDBOXRUN_TEST_ZYGOTE": uuid.uuid4().hex}
    monkeypatch.setattr(client, "_BOOT", "import sys; sys.exit(3)")
    manager = ProcessManager(2, 60 * SCALE, backend=backend, start_method="zygote", env=env)  # type: ignore[arg-type]
    results = _run(manager, _doubles(), how)
    assert len(results) == len(VALUES)
    for result in results:
        assert not result.success and result.exit_code is None, result
        assert isinstance(result.exception, SandboxrunError), result
        assert isinstance(result.exception.__cause__, client.ZygoteError), result
        text = str(result.exception)
        assert "could not be started, no task code ran" in text and "exit code 3" in text, text
        assert "start_method='fork'" in text, text  # what to do
    monkeypatch.undo()  # zygotes start again: the same manager runs its next tasks
    again = _run(manager, _doubles(), how)
    assert sorted(r.result for r in again) == [2 * v for v in VALUES], again


def _failing_nth_sandbox(backend: Backend, nth: int) -> None:
    """The ``nth`` sandbox (1-based) the launcher asks of the backend cannot be made."""
    made = [0]
    # The zygote asks for slot_sandbox (which may call sandbox itself), the others sandbox.
    name = "slot_sandbox" if ZYGOTE_AVAILABLE else "sandbox"
    make: Callable[[Limits], Sandbox] = getattr(backend, name)

    def sandbox(limits: Limits) -> Sandbox:
        made[0] += 1
        if made[0] == nth:
            raise OSError(28, "No space left on device (made up by the test)")
        return make(limits)

    setattr(backend, name, sandbox)


@pytest.mark.parametrize("how", ["with", "as_completed"])
def test_a_sandbox_that_cannot_be_made_fails_its_task_alone(backend: str, how: str) -> None:
    made = create_backend(backend)  # type: ignore[arg-type]
    _failing_nth_sandbox(made, 2)
    manager = ProcessManager(1, 60 * SCALE, backend=made)
    results = _run(manager, _doubles(), how)
    assert len(results) == len(VALUES)
    failed = [r for r in results if not r.success]
    assert len(failed) == 1 and failed[0].task.args == (VALUES[1],), results
    assert isinstance(failed[0].exception, SandboxrunError)
    assert isinstance(failed[0].exception.__cause__, OSError)
    assert "No space left on device" in str(failed[0].exception)
    assert sorted(r.result for r in results if r.success) == [2, 6]


def _refuse(ids: Any) -> None:
    raise OSError(13, "Permission denied (made up by the test)")


@pytest.mark.parametrize("how", ["with", "as_completed"])
def test_a_launch_that_fails_fails_its_task_alone(backend: str, how: str) -> None:
    queued = _doubles()
    queued[0]._launch_hook = LaunchHook(_refuse)  # raises in the launcher, before any process
    results = _run(ProcessManager(2, 60 * SCALE, backend=backend), queued, how)
    by_value = {r.task.args[0]: r for r in results}
    assert len(results) == len(VALUES)
    assert not by_value[1].success and isinstance(by_value[1].exception.__cause__, OSError)
    assert "Permission denied" in str(by_value[1].exception)
    assert by_value[2].result == 4 and by_value[3].result == 6


def test_a_backend_that_cannot_open_fails_the_tasks_then_opens(backend: str) -> None:
    made = create_backend(backend)  # type: ignore[arg-type]
    real_open, calls = made.open, [0]

    def open_once_failing() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise PermissionError(13, "cannot create the runner cgroup (made up by the test)")
        real_open()

    made.open = open_once_failing  # type: ignore[method-assign]
    manager = ProcessManager(len(VALUES), 60 * SCALE, backend=made)
    results = _run(manager, _doubles(), "with")
    assert [r.success for r in results] == [False] * len(VALUES), results
    assert all("cannot create the runner cgroup" in str(r.exception) for r in results)
    again = _run(manager, _doubles(), "with")
    assert sorted(r.result for r in again) == [2 * v for v in VALUES], again


def test_ctrl_c_at_launch_still_aborts(backend: str) -> None:
    def interrupt(ids: Any) -> None:
        raise KeyboardInterrupt

    queued = _doubles()
    queued[1]._launch_hook = LaunchHook(interrupt)
    manager = ProcessManager(1, 60 * SCALE, backend=backend)
    with pytest.raises(KeyboardInterrupt):
        _run(manager, queued, "with")
    with pytest.raises(RuntimeError, match="aborted"):
        manager.queue_task(Task(tasks.double, (1,)))
