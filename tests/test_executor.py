"""SandboxExecutor: the concurrent.futures.Executor contract, one sandboxed process per call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copyreg
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandboxrun
from sandboxrun import (
    RemoteTraceback,
    SandboxExecutor,
    SandboxFuture,
    TaskCancelled,
    WorkerDied,
    task_result,
)

from . import tasks
from .conftest import SCALE, wait_gone, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def executor() -> Iterator[SandboxExecutor]:
    with SandboxExecutor(2) as running:
        yield running


def test_submit_returns_the_value_and_the_task_result(executor: SandboxExecutor) -> None:
    future = executor.submit(tasks.pid_and_value, "x")
    assert isinstance(future, SandboxFuture)
    pid, value = future.result(timeout=30)
    assert value == "x"
    assert pid != os.getpid()  # a fresh process, not this one
    result = task_result(future)
    assert result is future.task_result
    assert result is not None and result.success and result.result == (pid, "x")
    assert result.task is future.task
    assert future.task.func is tasks.pid_and_value and future.task.args == ("x",)


def test_each_call_gets_its_own_process(executor: SandboxExecutor) -> None:
    pids = [pid for pid, _ in executor.map(tasks.pid_and_value, range(6))]
    assert len(set(pids)) == 6


def test_map_keeps_order_and_accepts_chunksize_and_timeout(executor: SandboxExecutor) -> None:
    assert list(executor.map(tasks.double, range(5), chunksize=3, timeout=60)) == [0, 2, 4, 6, 8]
    assert list(executor.map(pow, [2, 3], [3, 2])) == [8, 9]  # several iterables, as the stdlib
    with pytest.raises(TimeoutError):
        list(executor.map(tasks.sleep_then, [2], timeout=0.3))


def test_the_tasks_exception_is_raised_with_the_remote_traceback(
    executor: SandboxExecutor,
) -> None:
    future = executor.submit(tasks.raise_value_error, "bad input")
    with pytest.raises(ValueError, match="bad input") as caught:
        future.result(timeout=30)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in cause.tb  # the worker's own frames, as text
    assert future.task_result is not None and not future.task_result.success


def test_a_timeout_is_a_timeout_error() -> None:
    with SandboxExecutor(1, worker_timeout_seconds=0.5 * SCALE) as executor:
        future = executor.submit(tasks.sleep_then, 30)
        with pytest.raises(TimeoutError, match="worker_timeout_seconds"):
            future.result(timeout=30 * SCALE)
    assert future.task_result is not None and future.task_result.timed_out


def test_memory_limit_is_a_memory_error(backend: str) -> None:
    with SandboxExecutor(1, memory_limit_in_gib=0.1, backend=backend) as executor:  # type: ignore[arg-type]
        future = executor.submit(tasks.allocate, 20, 30, 0.02)
        with pytest.raises(MemoryError):
            future.result(timeout=60 * SCALE)
    assert future.task_result is not None and future.task_result.out_of_memory


def test_a_crash_is_worker_died(executor: SandboxExecutor) -> None:
    with pytest.raises(WorkerDied) as caught:
        executor.submit(tasks.exit_hard, 3).result(timeout=30)
    assert caught.value.exit_code == 3


def test_an_unpicklable_call_fails_its_future_not_the_executor(
    executor: SandboxExecutor,
) -> None:
    bad = executor.submit(lambda: 1)  # spawn/forkserver: must pickle
    with pytest.raises(TypeError, match="cannot be sent to a worker"):
        bad.result(timeout=30)
    assert executor.submit(tasks.double, 21).result(timeout=30) == 42


def test_a_task_submitted_while_another_runs_starts_at_once(tmp_path: Path) -> None:
    # No limit, no polling on a kernel backend: the loop sleeps in select() with no timeout,
    # so only the wake-up fd can make it launch the second task before the first ends.
    with SandboxExecutor(2) as executor:
        slow = executor.submit(tasks.sleep_then, 8 * SCALE, "slow")
        assert wait_until(slow.running, 10)
        time.sleep(0.3)  # the loop is back in select()
        started = time.monotonic()
        assert executor.submit(tasks.double, 4).result(timeout=30) == 8
        assert time.monotonic() - started < 5 * SCALE
        assert not slow.done()
        executor.kill(slow)


def test_pending_futures_cancel_running_ones_do_not(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    release = tmp_path / "release"
    with SandboxExecutor(1) as executor:
        first = executor.submit(tasks.wait_for_file, str(tmp_path / "pid"), str(release), 30)
        second = executor.submit(tasks.touch_after, str(marker), 0)
        assert wait_until(first.running, 10)
        assert not second.running()
        assert second.cancel()
        assert not first.cancel()  # running: the stdlib contract
        release.touch()
        assert first.result(timeout=30) is True
        assert second.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            second.result()
    assert not marker.exists()  # the cancelled call never ran
    assert second.task_result is None


def test_kill_ends_a_running_task_and_its_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with SandboxExecutor(1) as executor:
        future = executor.submit(tasks.wait_for_file, str(pid_file), str(tmp_path / "never"), 60)
        assert wait_until(pid_file.exists, 20)
        pid = tasks.read_pid(pid_file)
        executor.kill(future)
        with pytest.raises(TaskCancelled):
            future.result(timeout=30)
        assert wait_gone(pid)
    result = future.task_result
    assert result is not None and not result.success and not result.timed_out
    assert sandboxrun.TaskResult is type(result)


def test_shutdown_cancel_futures_drops_the_pending_and_finishes_the_running(
    tmp_path: Path,
) -> None:
    executor = SandboxExecutor(1)
    running = executor.submit(tasks.sleep_then, 0.5, "done")
    queued = [executor.submit(tasks.touch_after, str(tmp_path / f"q{i}"), 0) for i in range(3)]
    assert wait_until(running.running, 10)
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "done"
    assert all(future.cancelled() for future in queued)
    assert not list(tmp_path.glob("q*"))
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(tasks.double, 1)


def test_shutdown_without_wait_still_runs_what_was_queued() -> None:
    executor = SandboxExecutor(2)
    futures = [executor.submit(tasks.double, i) for i in range(3)]
    executor.shutdown(wait=False)
    assert [future.result(timeout=60) for future in futures] == [0, 2, 4]
    executor._thread.join(30)
    assert not executor._thread.is_alive()  # idle and shut down: the loop thread ended


def test_as_completed_and_wait_from_concurrent_futures(executor: SandboxExecutor) -> None:
    unit = max(1.0, SCALE / 4)  # a task's life takes 1-2 s in the guest: keep the order clear
    delays = (1.0 * unit, 0.0, 0.5 * unit)
    futures = [executor.submit(tasks.sleep_then, delay, delay) for delay in delays]
    order = [f.result() for f in concurrent.futures.as_completed(futures, timeout=60 * unit)]
    assert sorted(order) == sorted(delays)
    assert order[-1] == 1.0 * unit  # with two slots the 1 s task cannot finish before the 0 s one
    more = [executor.submit(tasks.double, i) for i in range(3)]
    done, not_done = concurrent.futures.wait(more, timeout=60)
    assert not not_done and {f.result() for f in done} == {0, 2, 4}
    failing = executor.submit(tasks.raise_value_error, "x")
    slow = executor.submit(tasks.sleep_then, 20)
    done, not_done = concurrent.futures.wait(
        [failing, slow], timeout=60, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    assert done == {failing} and not_done == {slow}
    executor.kill(slow)


def test_loop_run_in_executor() -> None:
    async def main(executor: SandboxExecutor) -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(executor, tasks.double, i) for i in range(3)]
        return list(await asyncio.gather(*calls))

    with SandboxExecutor(2) as executor:
        assert asyncio.run(main(executor)) == [0, 2, 4]


def test_fork_is_refused_and_the_default_is_not_fork() -> None:
    with pytest.raises(ValueError, match="gh-90622"):
        SandboxExecutor(1, start_method="fork")
    executor = SandboxExecutor(1)
    try:
        assert executor.start_method != "fork"
        assert executor.submit(tasks.double, 1).result(timeout=30) == 2
    finally:
        executor.shutdown()


def _foreign_reducer(error: BaseException) -> tuple[Any, ...]:
    """What tblib (installed by distributed) registers for every exception class."""
    return (_rebuild, (type(error), error.args))


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    return cls(*args)


def test_exception_reducers_installed_in_the_manager_do_not_break_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # distributed calls tblib.pickling_support.install(): copyreg reducers for every exception
    # class, which fork (and forkserver's __main__ import) children inherit. A task's exception
    # then named tblib's function, which the restricted unpickler refuses: ResultTypeRefused.
    monkeypatch.setitem(copyreg.dispatch_table, ValueError, _foreign_reducer)
    with sandboxrun.ProcessManager(1, start_method="fork", isolation="none") as manager:
        manager.queue_task(sandboxrun.Task(tasks.raise_value_error, ("still a ValueError",)))
    error = manager.task_results[0].exception
    assert type(error) is ValueError and str(error) == "still a ValueError"


def test_a_done_callback_that_submits_does_not_deadlock_shutdown(tmp_path: Path) -> None:
    executor = SandboxExecutor(1)
    running = executor.submit(tasks.sleep_then, 0.5)
    pending = executor.submit(tasks.double, 1)
    refused: list[BaseException] = []

    def resubmit(_: object) -> None:
        try:
            executor.submit(tasks.double, 2)
        except RuntimeError as error:
            refused.append(error)

    pending.add_done_callback(resubmit)
    assert wait_until(running.running, 10)
    executor.shutdown(wait=True, cancel_futures=True)  # the callback runs inside: no deadlock
    assert pending.cancelled() and len(refused) == 1
