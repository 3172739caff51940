"""asyncio on top of ``SandboxExecutor``: await one sandboxed call, or stream many results.

Nothing here blocks the event loop: the executor's own thread runs the scheduler, and its
futures reach the loop through ``asyncio.wrap_future`` (a thread-safe callback)::

    await sandbox.run(fn, x)      --submit--> SandboxFuture --wrap_future--> awaited
    async for r in sandbox.as_completed(tasks)      (TaskResults, as each task ends)
    the awaiting coroutine cancelled --> executor.kill(future) --> TaskCancelled, tree killed

A cancelled ``await`` returns (raising ``CancelledError``) only once the task's process is
gone, so a web handler that times out a request leaves nothing running behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._executor import ManagerOptions, SandboxExecutor, SandboxFuture
from ._task import Task, TaskResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: How long a cancelled await waits for the killed task's process to be reaped.
_KILL_WAIT_SECONDS = 10.0


class AsyncSandbox:
    """An asyncio front to one ``SandboxExecutor`` (same options as ``ProcessManager``)::

        async with AsyncSandbox(4, worker_timeout_seconds=5) as sandbox:
            value = await sandbox.run(convert, path)           # value, or the task's exception
            async for result in sandbox.as_completed(tasks):   # TaskResult objects
                ...
    """

    def __init__(self, max_workers: int | None = None, **options: Unpack[ManagerOptions]) -> None:
        self.executor = SandboxExecutor(max_workers, **options)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut the executor down (queued tasks still run), without blocking the loop."""
        self.executor.shutdown(wait=False)
        await asyncio.to_thread(self.executor.shutdown, True)

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a fresh sandboxed process: its value, or its exception."""
        future = self.executor.submit(fn, *args, **kwargs)
        await self._settle(future)
        return future.result()

    async def run_task(self, task: Task) -> TaskResult:
        """Run one ``Task`` and return its ``TaskResult`` (a failure is a result, not raised)."""
        future = self.executor.submit_task(task)
        await self._settle(future)
        assert future.task_result is not None  # done and never cancelled while pending
        return future.task_result

    async def as_completed(self, tasks: Iterable[Task]) -> AsyncIterator[TaskResult]:
        """Submit every task, then yield each ``TaskResult`` as its task ends. Leaving the
        loop early (``break``, an exception, a cancellation) kills the tasks still running."""
        futures = {_wrap(future): future for future in self._submit_all(tasks)}
        try:
            while futures:
                done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
                for waiter in done:
                    future = futures.pop(waiter)
                    if future.task_result is not None:
                        yield future.task_result
        finally:
            for waiter, future in futures.items():
                waiter.cancel()
                self.executor.kill(future)

    def _submit_all(self, tasks: Iterable[Task]) -> list[SandboxFuture]:
        return [self.executor.submit_task(task) for task in tasks]

    async def _settle(self, future: SandboxFuture) -> None:
        """Wait for the future without blocking the loop; a cancellation kills its task."""
        try:
            await asyncio.wait([_wrap(future)])
        except asyncio.CancelledError:
            self.executor.kill(future)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([_wrap(future)], timeout=_KILL_WAIT_SECONDS)
            raise


def _wrap(future: SandboxFuture) -> asyncio.Future[Any]:
    """The future on this loop; its exception counts as seen (the caller reads the
    ``SandboxFuture``, so asyncio must not log it as never retrieved)."""
    waiter = asyncio.wrap_future(future)
    waiter.add_done_callback(_seen)
    return waiter


def _seen(waiter: asyncio.Future[Any]) -> None:
    if not waiter.cancelled():
        waiter.exception()


async def run_async(
    fn: Callable[..., Any], /, *args: Any, **options: Unpack[ManagerOptions]
) -> Any:
    """``await run_async(fn, *args, worker_timeout_seconds=5)``: one call in a fresh sandboxed
    process, from a running event loop; its value, or its exception. ``options`` are the
    ``ProcessManager`` limits (pass keyword arguments of ``fn`` with ``functools.partial``)."""
    sandbox = AsyncSandbox(1, **options)
    try:
        return await sandbox.run(fn, *args)
    finally:
        sandbox.executor.shutdown(wait=False)
