"""``ProcessManager``: a fresh process per task, at most ``max_workers`` at once, one result each.

The scheduler is one single-threaded event loop over file descriptors (a pidfd per worker, the
result pipes, the control pipes being written) with the nearest deadline as the select timeout.
It never sleeps in a busy loop and never blocks on one worker while another needs attention.

Life of one job::

    PENDING --launch--> HANDSHAKE --go frame written--> RUNNING --process ended--> DONE
                           |                               |
                           +----- kill (timeout, polled limit, abort) ------------+

Every path into DONE goes through ``_finish``, which builds exactly one ``TaskResult``.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import multiprocessing
import os
import pickle
import selectors
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from . import _protocol as protocol
from . import _worker
from ._backends import create_backend
from ._backends.base import Backend, Sandbox, Usage
from ._cpus import available_cpus
from ._errors import (
    CpuTimeLimitExceeded,
    ExceptionNotPicklable,
    ProcessLimitExceeded,
    RemoteTraceback,
    ResultNotPicklable,
    ResultTransferError,
    SandboxrunError,
    WorkerDied,
)
from ._fork import ForkedProcess
from ._limits import GIB, Limits
from ._task import Task, TaskResult

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031


class _State(enum.Enum):
    OPEN = "open"  # queueing, nothing started
    RUNNING = "running"  # the loop has started tasks
    FINISHED = "finished"  # left the with-block normally
    ABORTED = "aborted"  # the with-body raised: tasks killed, queue dropped


class _Job:
    """Book-keeping for one launched task (parent side)."""

    __slots__ = (
        "control_fd",
        "deadline",
        "end_time",
        "error",
        "exit_fd",
        "go_frame",
        "kill_reason",
        "next_poll",
        "process",
        "reader",
        "result_fd",
        "sandbox",
        "start_time",
        "task",
    )

    def __init__(self, task: Task, sandbox: Sandbox) -> None:
        self.task = task
        self.sandbox = sandbox
        self.process: Any = None
        self.exit_fd = -1
        self.result_fd = -1
        self.control_fd = -1
        self.go_frame: memoryview | None = None
        self.reader = protocol.ResultReader()
        self.start_time = 0.0
        self.end_time = 0.0
        self.deadline: float | None = None
        self.next_poll: float | None = None
        self.kill_reason: str | None = None
        self.error: BaseException | None = None


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return False
    return True


_HAVE_PIDFD = _pidfd_works()


def _set_pipe_size(fd: int) -> None:
    # A bigger pipe means fewer wake-ups per large result (Linux only; harmless elsewhere).
    if sys.platform.startswith("linux"):
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class ProcessManager:
    """Run each queued ``Task`` in a fresh process under kernel-enforced limits.

    Drop-in for the Glasswall process manager::

        with ProcessManager(None, worker_timeout_seconds=5, memory_limit_in_gib=4) as pm:
            for path in paths:
                pm.queue_task(Task(func=convert, args=(path,)))
        for result in pm.task_results:
            print(result)

    ``max_workers=None`` means the CPUs this process may use (affinity and cgroup quota aware).
    Keyword-only extras: ``cpu_time_limit_seconds`` (RLIMIT_CPU), ``max_processes`` (fork-bomb
    limit, ``pids.max`` on the kernel backends), ``backend`` (``"auto"``, ``"cgroup_v2"``,
    ``"cgroup_v1"``, ``"psutil"``), ``start_method`` (``"fork"``, ``"forkserver"``, ``"spawn"``;
    default: multiprocessing's default) and ``poll_interval_seconds`` (psutil backend only).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        worker_timeout_seconds: float | None = None,
        memory_limit_in_gib: float | None = None,
        *,
        cpu_time_limit_seconds: float | None = None,
        max_processes: int | None = None,
        backend: str | Backend = "auto",
        start_method: str | None = None,
        poll_interval_seconds: float = 0.05,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int)
        ):
            raise TypeError(f"max_workers must be an int or None, got {max_workers!r}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if not (isinstance(poll_interval_seconds, (int, float)) and poll_interval_seconds > 0):
            raise ValueError(
                f"poll_interval_seconds must be positive, got {poll_interval_seconds!r}"
            )
        self.limits = Limits.from_arguments(
            worker_timeout_seconds, memory_limit_in_gib, cpu_time_limit_seconds, max_processes
        )
        if cpu_time_limit_seconds is not None and sys.platform == "win32":
            raise ValueError("cpu_time_limit_seconds needs RLIMIT_CPU, which Windows lacks")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
        self.max_workers: int = max_workers or available_cpus()
        self.worker_timeout_seconds = worker_timeout_seconds
        self.memory_limit_in_gib = memory_limit_in_gib
        self.cpu_time_limit_seconds = cpu_time_limit_seconds
        self.max_processes = max_processes
        self.start_method: str = start_method or multiprocessing.get_start_method()
        self._context = multiprocessing.get_context(self.start_method)
        self.backend: Backend = (
            backend
            if isinstance(backend, Backend)
            else create_backend(backend, poll_interval_seconds=poll_interval_seconds)
        )
        self.task_results: list[TaskResult] = []
        self._pending: collections.deque[tuple[Task, bytes]] = collections.deque()
        self._jobs: dict[int, _Job] = {}  # keyed by exit fd
        self._ready: collections.deque[TaskResult] = collections.deque()
        self._selector: selectors.BaseSelector | None = None
        self._backend_open = False
        self._state = _State.OPEN

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> ProcessManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            for result in self._results():
                self.task_results.append(result)
        except BaseException:
            self._abort()
            raise
        finally:
            self._close()
        self._state = _State.FINISHED

    def queue_task(self, task: Task) -> None:
        """Add a task. Under spawn/forkserver it must pickle; that is checked here, not later."""
        if not isinstance(task, Task):
            raise TypeError(f"queue_task takes a Task, got {type(task).__name__}")
        if self._state in (_State.FINISHED, _State.ABORTED):
            raise RuntimeError(f"queue_task on a {self._state.value} ProcessManager")
        payload = b""
        if self.start_method != "fork":
            try:
                payload = pickle.dumps(task, protocol=5)
            except Exception as error:
                raise TypeError(
                    f"{task!r} cannot be sent to a worker under start method "
                    f"{self.start_method!r}: {type(error).__name__}: {error}. Define the function "
                    "at module level and pass picklable arguments, or use start_method='fork'."
                ) from error
        self._pending.append((task, payload))

    def as_completed(self) -> Iterator[TaskResult]:
        """Start processing and yield each result as its task ends (``task_results`` stays empty).

        Leaving the loop early loses nothing: the remaining tasks finish on exit of the
        with-block and land in ``task_results``.
        """
        if self._state in (_State.FINISHED, _State.ABORTED):
            raise RuntimeError(f"as_completed on a {self._state.value} ProcessManager")
        yield from self._results()

    # ------------------------------------------------------------------ the loop

    def _results(self) -> Iterator[TaskResult]:
        # Finished results wait in self._ready until handed out one by one, so a caller that
        # leaves the loop early loses none of a batch that ended in the same select() round.
        self._state = _State.RUNNING
        while self._ready or self._pending or self._jobs:
            if not self._ready:
                self._ready.extend(self._step())
            if self._ready:
                yield self._ready.popleft()

    def _step(self) -> list[TaskResult]:
        self._fill_slots()
        selector = self._ensure_selector()
        events = selector.select(self._select_timeout())
        done: list[TaskResult] = []
        now = time.monotonic()
        for key, mask in events:
            job: _Job = key.data
            if key.fd == job.exit_fd and job.exit_fd in self._jobs:
                done.append(self._finish(job))
            elif key.fd == job.result_fd and mask & selectors.EVENT_READ:
                self._read_result(job)
            elif key.fd == job.control_fd and mask & selectors.EVENT_WRITE:
                self._write_go(job, now)
            elif key.fd == job.sandbox.event_fd:
                verdict = job.sandbox.on_event()
                if verdict is not None:
                    self._kill(job, verdict)
        for job in list(self._jobs.values()):
            if job.deadline is not None and now >= job.deadline:
                self._kill(job, "timeout")
            elif job.next_poll is not None and now >= job.next_poll:
                verdict = job.sandbox.poll()
                if verdict is not None:
                    self._kill(job, verdict)
                else:
                    job.next_poll = now + (job.sandbox.poll_interval_seconds or 0.05)
        return done

    def _select_timeout(self) -> float | None:
        moments = [
            moment
            for job in self._jobs.values()
            for moment in (job.deadline, job.next_poll)
            if moment is not None
        ]
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    def _ensure_selector(self) -> selectors.BaseSelector:
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
        return self._selector

    # ------------------------------------------------------------------ launching

    def _fill_slots(self) -> None:
        while self._pending and len(self._jobs) < self.max_workers:
            task, payload = self._pending.popleft()
            self._launch(task, payload)

    def _launch(self, task: Task, payload: bytes) -> None:
        if not self._backend_open:
            self.backend.open()
            self._backend_open = True
        job = _Job(task, self.backend.sandbox(self.limits))
        # The control pipe exists only when the worker must wait for us: to receive the pickled
        # task (spawn/forkserver), or until a parent-side attach has placed it (handshake).
        handshake = bool(payload) or job.sandbox.parent_attach
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe() if handshake else (-1, -1)
        _set_pipe_size(result_w)
        child_result = Connection(result_w)
        child_control = Connection(control_r) if handshake else None
        foreign = tuple(fd for other in self._jobs.values() for fd in self._parent_fds(other))
        foreign += tuple(fd for fd in (result_r, control_w) if fd >= 0)
        bare_fork = self.start_method == "fork" and _HAVE_PIDFD
        launcher = ForkedProcess if bare_fork else self._context.Process
        job.process = launcher(
            target=_worker.main,
            args=(
                child_control,
                child_result,
                task if self.start_method == "fork" else None,
                job.sandbox.enter_files(),
                self.backend.worker_options,
                self.limits.cpu_time_seconds,
                foreign if self.start_method == "fork" else (),
                # A forkserver child's parent is the server, not us: no pid to compare.
                None if self.start_method == "forkserver" else os.getpid(),
            ),
        )
        job.start_time = time.time()
        try:
            job.process.start()
        except BaseException:
            for fd in (result_r, control_w):
                if fd >= 0:
                    os.close(fd)
            job.sandbox.remove()
            raise
        finally:
            # The parent must not hold the child's ends, or EOF would never come.
            child_result.close()
            if child_control is not None:
                child_control.close()
        job.result_fd, job.control_fd = result_r, control_w
        os.set_blocking(result_r, False)
        job.exit_fd = self._exit_fd(job.process)
        self._jobs[job.exit_fd] = job
        selector = self._ensure_selector()
        selector.register(job.exit_fd, selectors.EVENT_READ, job)
        selector.register(job.result_fd, selectors.EVENT_READ, job)
        try:
            job.sandbox.attach(job.process.pid)
        except Exception as error:
            # The worker is still waiting for the go frame, so no task code ran.
            job.kill_reason = "attach"
            job.error = error
            job.sandbox.kill()
            with contextlib.suppress(OSError):
                job.process.kill()
            return
        if job.sandbox.event_fd is not None:
            selector.register(job.sandbox.event_fd, selectors.EVENT_READ, job)
        if not handshake:
            self._arm(job, time.monotonic())
            return
        os.set_blocking(control_w, False)
        job.go_frame = memoryview(protocol.LENGTH.pack(len(payload)) + payload)
        self._write_go(job, time.monotonic())
        if job.go_frame is not None:
            selector.register(job.control_fd, selectors.EVENT_WRITE, job)

    @staticmethod
    def _parent_fds(job: _Job) -> tuple[int, ...]:
        fds = (job.result_fd, job.control_fd, job.exit_fd, job.sandbox.event_fd)
        return tuple(fd for fd in fds if fd is not None and fd >= 0)

    @staticmethod
    def _exit_fd(process: Any) -> int:
        # A pidfd turns readable when the process ends, whoever holds its pipes; the
        # multiprocessing sentinel (a pipe) would wait for grandchildren that inherited it.
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                return os.pidfd_open(process.pid)
        return os.dup(process.sentinel)  # no pidfd (macOS): multiprocessing's sentinel pipe

    def _write_go(self, job: _Job, now: float) -> None:
        if job.go_frame is None:
            return
        try:
            written = os.write(job.control_fd, job.go_frame)
        except BlockingIOError:
            return
        except OSError:  # the worker died before reading: its exit event will report it
            written = len(job.go_frame)
        job.go_frame = job.go_frame[written:]
        if job.go_frame:
            return
        job.go_frame = None
        self._close_control(job)
        self._arm(job, now)

    def _arm(self, job: _Job, now: float) -> None:
        """The worker may now run task code: start its clock and its polling."""
        if self.limits.wall_time_seconds is not None:
            job.deadline = now + self.limits.wall_time_seconds
        if job.sandbox.poll_interval_seconds is not None:
            job.next_poll = now

    def _close_control(self, job: _Job) -> None:
        if job.control_fd < 0:
            return
        assert self._selector is not None
        with contextlib.suppress(KeyError):
            self._selector.unregister(job.control_fd)
        os.close(job.control_fd)
        job.control_fd = -1

    # ------------------------------------------------------------------ results

    def _read_result(self, job: _Job) -> None:
        if job.reader.feed(job.result_fd):
            self._stop_reading(job)

    def _stop_reading(self, job: _Job) -> None:
        if job.result_fd < 0:
            return
        assert self._selector is not None
        with contextlib.suppress(KeyError):
            self._selector.unregister(job.result_fd)
        os.close(job.result_fd)
        job.result_fd = -1

    def _kill(self, job: _Job, reason: str) -> None:
        if job.kill_reason is None:
            job.kill_reason = reason
        job.deadline = None
        job.next_poll = None
        job.sandbox.kill()

    def _finish(self, job: _Job) -> TaskResult:
        """The worker process has ended: collect everything and build its one result."""
        job.end_time = time.time()
        selector = self._ensure_selector()
        for fd in (job.exit_fd, job.sandbox.event_fd):
            if fd is not None:
                with contextlib.suppress(KeyError):
                    selector.unregister(fd)
        del self._jobs[job.exit_fd]
        try:
            # Leftover grandchildren die first, so nothing else writes into the result pipe.
            usage = job.sandbox.collect()
        except Exception:
            usage = Usage()
        finally:
            job.sandbox.remove()
        if job.result_fd >= 0:
            self._read_result(job)
            self._stop_reading(job)
        self._close_control(job)
        os.close(job.exit_fd)
        job.process.join()
        exit_code = job.process.exitcode
        job.process.close()
        return self._build_result(job, usage, -9 if exit_code is None else exit_code)

    def _decode(self, job: _Job) -> tuple[protocol.Header | None, Any, BaseException | None]:
        """(header, returned value, exception) from a complete frame; header None if incomplete."""
        frame = job.reader.take()
        if frame is None:
            return None, None, None
        header, body = frame
        try:
            with body:
                return header, *self._interpret(header, body)
        finally:
            job.reader.close()

    @staticmethod
    def _interpret(header: protocol.Header, body: memoryview) -> tuple[Any, BaseException | None]:
        """(returned value, exception) from a frame whose header arrived."""
        if header.kind == protocol.ENTER_FAILED:
            text = f"the worker could not enter its sandbox, no task code ran: {header.text}"
            return None, SandboxrunError(text)
        what = (
            "exception"
            if header.kind in (protocol.RAISED, protocol.EXCEPTION_UNPICKLABLE)
            else "result"
        )
        kind = ExceptionNotPicklable if what == "exception" else ResultNotPicklable
        if header.kind in (protocol.RESULT_UNPICKLABLE, protocol.EXCEPTION_UNPICKLABLE):
            text = (
                f"the task's {what} ({header.type_name}: {header.text:.200}) cannot be pickled:"
                f" {header.traceback_text.splitlines()[-1] if header.traceback_text else ''}"
            )
            return None, kind(text, header.type_name, header.text, header.traceback_text)
        try:
            value = pickle.loads(body)
        except Exception as error:
            text = f"the task's {what} could not be unpickled here: {type(error).__name__}: {error}"
            return None, kind(text, type(error).__name__, str(error), header.traceback_text)
        if header.kind != protocol.RAISED:
            return value, None
        if isinstance(value, BaseException):
            value.__cause__ = RemoteTraceback(header.traceback_text)
            return None, value
        return None, SandboxrunError(f"worker sent a non-exception: {value!r:.200}")

    def _build_result(self, job: _Job, usage: Usage, exit_code: int) -> TaskResult:
        header, value, exception = self._decode(job)
        peak = max(usage.peak_memory_bytes or 0, header.max_rss_bytes if header else 0)
        cpu_time = usage.cpu_time_seconds
        if cpu_time is None and header is not None:
            cpu_time = header.cpu_time_seconds
        reason = job.kill_reason
        timed_out = reason == "timeout"
        limit_set = self.limits.memory_bytes is not None
        out_of_memory = reason == "memory" or (
            not timed_out
            and (usage.oom_killed or (limit_set and isinstance(exception, MemoryError)))
        )
        cpu_exceeded = (
            self.limits.cpu_time_seconds is not None
            and not timed_out
            and not out_of_memory
            and exit_code in (-_signal_number("SIGXCPU"), -9)
            and (cpu_time is None or cpu_time >= self.limits.cpu_time_seconds * 0.9)
        )
        # pids.max makes fork() fail instead of killing: a task that hit it and then failed
        # failed because of it; one that coped with it (and succeeded) did not exceed anything.
        success = header is not None and header.kind == protocol.RETURNED and exception is None
        processes_exceeded = reason == "processes" or (usage.process_limit_hit and not success)
        verdicts = [
            (timed_out, lambda: TimeoutError(
                f"the task ran longer than worker_timeout_seconds={self.worker_timeout_seconds}"
                " and was killed with its whole process tree"
            )),
            (out_of_memory, lambda: exception if isinstance(exception, MemoryError) else MemoryError(  # noqa: E501
                f"the task exceeded memory_limit_in_gib={self.memory_limit_in_gib}"
                f" (peak {peak / GIB:.3f} GiB) and was killed"
            )),
            (cpu_exceeded, lambda: CpuTimeLimitExceeded(
                f"the task used more than cpu_time_limit_seconds={self.cpu_time_limit_seconds}"
            )),
            (processes_exceeded, lambda: _caused_by(ProcessLimitExceeded(
                f"the task ran more than max_processes={self.max_processes} processes"
            ), exception)),
            (reason == "attach", lambda: SandboxrunError(
                f"could not place the worker in its sandbox: {job.error}"
            )),
        ]  # fmt: skip
        verdict = next((make for condition, make in verdicts if condition), None)
        if verdict is not None:  # the first true condition, in that order, wins
            success, exception = False, verdict()
        elif header is None:
            cut = job.reader.started
            exception = WorkerDied(exit_code, "its result was cut off mid-write" if cut else "")
            if cut:
                exception.__cause__ = ResultTransferError("incomplete result frame")
        elif not success and exception is None:  # defensive: never success=False without a why
            exception = SandboxrunError(f"task failed ({header.kind})")
        return TaskResult(
            task=job.task,
            success=success,
            result=value if success else None,
            exception=exception,
            exit_code=exit_code,
            timeout_seconds=self.worker_timeout_seconds,
            memory_limit_in_gib=self.memory_limit_in_gib,
            start_time=job.start_time,
            end_time=job.end_time,
            elapsed_time=job.end_time - job.start_time,
            timed_out=timed_out,
            max_memory_used_in_gib=peak / GIB,
            out_of_memory=out_of_memory,
            cpu_time_used_seconds=cpu_time,
            cpu_time_limit_exceeded=cpu_exceeded,
            process_limit_exceeded=processes_exceeded,
            backend=self.backend.name,
        )

    # ------------------------------------------------------------------ shutting down

    def _abort(self) -> None:
        """The with-body raised: kill what runs, drop what waits, release everything."""
        self._state = _State.ABORTED
        self._pending.clear()
        try:
            for job in list(self._jobs.values()):
                self._kill(job, "abort")
            for job in list(self._jobs.values()):
                with contextlib.suppress(Exception):
                    job.process.join(timeout=10)
                with contextlib.suppress(Exception):
                    self._finish(job)
        finally:
            self._close()

    def _close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._backend_open:
            self._backend_open = False
            self.backend.close()


def _caused_by(error: BaseException, cause: BaseException | None) -> BaseException:
    error.__cause__ = cause  # keep what the task itself raised (e.g. the refused fork)
    return error


def _signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name, 0)) or -1
