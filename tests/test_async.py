"""The asyncio API: awaited from a running loop that keeps ticking; cancellation kills."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from sandboxrun import AsyncSandbox, Task, TaskCancelled, run_async

from . import tasks
from .conftest import SCALE, wait_gone

pytestmark = pytest.mark.timeout(90)

TICK = 0.05


class Ticker:
    """A timer on the loop: the gaps between its ticks show whether anything blocked it."""

    def __init__(self) -> None:
        self.ticks: list[float] = []

    async def run(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(TICK)

    def longest_gap(self, start: float, end: float) -> float:
        inside = [tick for tick in self.ticks if start <= tick <= end]
        return max((b - a for a, b in itertools.pairwise(inside)), default=end - start)


async def _ticking(coroutine_function: object) -> tuple[object, Ticker, float, float]:
    ticker = Ticker()
    timer = asyncio.create_task(ticker.run())
    await asyncio.sleep(TICK)
    start = time.monotonic()
    try:
        value = await coroutine_function()  # type: ignore[operator]
    finally:
        end = time.monotonic()
        timer.cancel()
    return value, ticker, start, end


def test_run_async_does_not_block_the_loop() -> None:
    async def call() -> object:
        return await run_async(tasks.sleep_then, 1.5, "slept")

    value, ticker, start, end = asyncio.run(_ticking(call))
    assert value == "slept"
    assert end - start >= 1.5
    # The loop ticked all along: no gap near the task's 1.5 s (a blocking wait would leave one).
    assert ticker.longest_gap(start, end) < 0.5 * SCALE
    assert len([t for t in ticker.ticks if start <= t <= end]) >= 10


def test_run_async_raises_the_tasks_exception_and_limits() -> None:
    with pytest.raises(ValueError, match="nope"):
        asyncio.run(run_async(tasks.raise_value_error, "nope"))
    with pytest.raises(TimeoutError):
        asyncio.run(run_async(tasks.sleep_then, 30, worker_timeout_seconds=0.5 * SCALE))


def test_as_completed_streams_task_results_in_completion_order() -> None:
    async def stream() -> list[object]:
        async with AsyncSandbox(2) as sandbox:
            # SCALE: a slot's zygote may start slower than 1.2 s in an emulated guest.
            work = [Task(tasks.sleep_then, (d, d)) for d in (1.2 * SCALE, 0.0)]
            work.append(Task(tasks.raise_value_error, ("bad",)))
            return [result async for result in sandbox.as_completed(work)]

    results, ticker, start, end = asyncio.run(_ticking(stream))
    assert isinstance(results, list)
    assert [r.result for r in results if r.success][-1] == 1.2 * SCALE  # the slow one last
    failed = [r for r in results if not r.success]
    assert len(failed) == 1 and isinstance(failed[0].exception, ValueError)
    assert ticker.longest_gap(start, end) < 0.5 * SCALE


def test_cancelling_the_await_kills_the_task(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def main() -> tuple[int, object]:
        async with AsyncSandbox(1) as sandbox:
            call = asyncio.create_task(
                sandbox.run_task(
                    Task(tasks.wait_for_file, (str(pid_file), str(tmp_path / "never"), 60))
                )
            )
            while not pid_file.exists():
                await asyncio.sleep(0.02)
            pid = tasks.read_pid(pid_file)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # The await returned only after the kill: the next task runs in the freed slot.
            after = await sandbox.run(tasks.double, 5)
            return pid, after

    started = time.monotonic()
    pid, after = asyncio.run(main())
    assert wait_gone(pid, 1)  # gone by the time the cancelled await returned
    assert after == 10
    assert time.monotonic() - started < 30 * SCALE  # not the task's 60 s


def test_leaving_the_stream_early_kills_the_rest(tmp_path: Path) -> None:
    async def main() -> list[object]:
        async with AsyncSandbox(2) as sandbox:
            work = [Task(tasks.sleep_then, (0, "quick"))]
            work.append(Task(tasks.wait_for_file, (str(tmp_path / "pid"), str(tmp_path / "x"), 60)))
            stream = sandbox.as_completed(work)
            first = await stream.__anext__()
            while not (tmp_path / "pid").exists():
                await asyncio.sleep(0.02)
            await stream.aclose()
            return [first, tasks.read_pid(tmp_path / "pid")]

    started = time.monotonic()
    first, pid = asyncio.run(main())
    assert first.result == "quick"  # type: ignore[attr-defined]
    assert wait_gone(pid)
    assert time.monotonic() - started < 30 * SCALE


def test_a_cancelled_run_result_says_cancelled(tmp_path: Path) -> None:
    async def main() -> object:
        async with AsyncSandbox(1) as sandbox:
            future = sandbox.executor.submit(tasks.sleep_then, 60)
            while not future.running():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            sandbox.executor.kill(future)
            await asyncio.wait([asyncio.wrap_future(future)], timeout=30)
            return future.task_result

    result = asyncio.run(main())
    assert result is not None
    assert isinstance(result.exception, TaskCancelled)  # type: ignore[attr-defined]
