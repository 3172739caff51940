"""``sandboxrun batch --scheduler tcp://HOST:8786``: the batch's tasks fanned out over Dask.

The slice of ``ProcessManager`` that ``batch.run_batch`` drives (``backend.name``, the
with-block, ``queue_task``, ``as_completed``), with each task run by ``sandboxrun.dask.run_task``
on whichever worker Dask picks, under that worker's own backend::

    queue_task(CommandTask) ... as_completed():
        client.submit(run_task, task, limits, pure=False) --Dask--> worker: fresh sandboxed process
        distributed.as_completed --TaskResult--> (the queued Task put back) --> the batch's journal
        a future that failed (KilledWorker: its workers kept dying) --> a failed TaskResult

Shared storage: the command lines hold absolute input and output paths, which must name the
same files on every worker (an NFS or other shared mount). The journal and its key stay here,
written by this process from the results: a worker never sees the key, and one that dies
mid-task costs no record (Dask reruns the task; a task that kills workers repeatedly comes back
as ``KilledWorker``, recorded as failed).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from .._executor import ManagerOptions
from .._task import Task, TaskResult

log = logging.getLogger("sandboxrun.cli")

CONNECT_TIMEOUT_SECONDS = 30


class ClusterUnavailable(Exception):
    """distributed is not installed, or the scheduler cannot be reached (the message says)."""


class _OnTheWorkers:
    """What the batch prints as the backend: each worker chooses its own."""

    name = "each Dask worker's own"


class DaskBatch:
    """Runs queued tasks on a Dask cluster, results as they complete (``run_batch``'s manager)."""

    backend = _OnTheWorkers()

    def __init__(self, address: str, max_workers: int | None, options: ManagerOptions) -> None:
        try:  # typed Any: distributed's own API is untyped, and may be absent when type-checked
            self._distributed: Any = importlib.import_module("distributed")
        except ImportError:
            raise ClusterUnavailable(
                "--scheduler needs Dask distributed: pip install 'sandboxrun[dask]'"
            ) from None
        try:
            self.client: Any = self._distributed.Client(address, timeout=CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError, ValueError) as error:
            message = f"cannot reach the Dask scheduler {address}: {error}"
            raise ClusterUnavailable(message) from None
        self.max_workers = max_workers
        self.options = options
        self._queued: list[Task] = []
        self._futures: list[Any] = []
        self._batch = uuid.uuid4().hex[:12]  # keys unique to this run: no result reused

    def __enter__(self) -> DaskBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is not None:  # Ctrl-C or a failure: the cluster must not keep working for us
            with contextlib.suppress(Exception):
                self.client.cancel(self._futures, force=True)
        with contextlib.suppress(Exception):
            self.client.close()

    def queue_task(self, task: Task) -> None:
        self._queued.append(task)

    def as_completed(self) -> Iterator[TaskResult]:
        from ..dask import run_task

        tasks, futures = {}, []
        for index, task in enumerate(self._queued):
            future = self.client.submit(
                run_task, task, self.max_workers, self.options,
                key=f"sandboxrun-batch-{self._batch}-{index}", pure=False,
            )  # fmt: skip
            tasks[future.key] = task
            futures.append(future)
        self._queued = []
        self._futures += futures
        for future in self._distributed.as_completed(futures):
            task = tasks[future.key]
            try:
                result: TaskResult = future.result()
            except Exception as error:  # the Dask task itself failed (KilledWorker, ...)
                log.warning("%r failed on the cluster (%s: %s): recorded as failed",
                            task, type(error).__name__, error)  # fmt: skip
                result = TaskResult(task=task, success=False, exception=error)
            result.task = task  # the queued object itself: the batch keys its records on it
            future.release()
            yield result
