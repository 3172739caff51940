"""The event loop: at most ``max_workers`` jobs at once, each driven from launch to one result.

One single thread selects over file descriptors (a pidfd per worker, the result pipes, the
control pipes being written, the sandboxes' event fds) with the nearest deadline or poll as the
timeout. It never sleeps in a busy loop and never blocks on one worker while another needs
attention.

Life of one job (the names are this module's methods)::

    pending --_launch--> started --attach--> HANDSHAKE --_write_go: all written--> ARMED
                            |                  (no go frame: _arm at once) ------->   |
                      attach failed                  |                                |
                            |                    on_event()        deadline, poll(), on_event()
                            v                        v                                v
                     _kill(ATTACH) ----------> KILLED (sandbox.kill) <---------- _kill(reason)
                                     abort: _kill(ABORT), from any state

    any state, exit fd readable (the process ended) --> _finish --> build_result --> TaskResult

ARMED means the deadline, the CPU-time check (``_cpu_budget``) and the polling run
(``job.deadline``/``job.cpu_deadline``/``job.next_poll`` set; a kill clears them). Every path
ends in ``_finish``, whoever ended the process, which builds exactly one ``TaskResult``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import signal
import sys
import time
from collections.abc import Callable, Iterator

import psutil

from . import _outcome as outcome
from . import _transport as transport
from ._backends.base import Backend, Sandbox, Usage
from ._cpu_budget import CpuBudget
from ._job import Job
from ._launch import Launcher
from ._reasons import KillReason
from ._task import Task, TaskResult

log = logging.getLogger("sandboxrun.scheduler")


def _descendants(pid: int | None) -> list[psutil.Process]:
    """The worker's process tree now (the worker is a subreaper: orphans stay below it)."""
    if pid is None:
        return []
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def _kill_by_pid(job: Job) -> None:
    """SIGKILL the worker itself, through its pidfd where there is one (no pid-reuse race)."""
    if sys.platform == "linux" and transport.EXIT_BY_PIDFD:
        try:
            signal.pidfd_send_signal(job.exit_fd, signal.SIGKILL)
            return
        except ProcessLookupError:
            return  # already ended: its exit event reports it
        except OSError:  # exit_fd is not a pidfd after all (a dup'ed sentinel)
            pass
    try:
        job.process.kill()
    except (OSError, ValueError) as error:  # gone, or already closed
        log.debug("%r: SIGKILL pid %s: %s", job.task, job.process.pid, error)


class Scheduler:
    def __init__(
        self, backend: Backend, launcher: Launcher, terms: outcome.Terms, max_workers: int
    ) -> None:
        self.backend = backend
        self.launcher = launcher
        self.terms = terms
        self.max_workers = max_workers
        self.cpu_budget = CpuBudget(terms.limits)
        self.pending: collections.deque[tuple[Task, bytes]] = collections.deque()
        self._jobs: dict[int, Job] = {}  # keyed by exit fd
        self._ready: collections.deque[TaskResult] = collections.deque()
        self._selector_made: selectors.BaseSelector | None = None
        self._backend_open = False
        self._wakeup: tuple[int, Callable[[], None]] | None = None  # see set_wakeup

    @property
    def _selector(self) -> selectors.BaseSelector:
        # Made on first use: a manager that never runs a task holds no epoll fd.
        if self._selector_made is None:
            self._selector_made = transport.Selector()
            if self._wakeup is not None:
                self._selector_made.register(self._wakeup[0], selectors.EVENT_READ, None)
        return self._selector_made

    # ------------------------------------------------------------------ the loop

    def results(self) -> Iterator[TaskResult]:
        # Finished results wait in self._ready until handed out one by one, so a caller that
        # leaves the loop early loses none of a batch that ended in the same select() round.
        while self._ready or self.pending or self._jobs:
            if not self._ready:
                self._ready.extend(self._step())
            if self._ready:
                yield self._ready.popleft()

    def _step(self) -> list[TaskResult]:
        failed = self._fill_slots()
        if failed:  # handed out first; with no job left, select() below would wait forever
            return failed
        events = self._selector.select(self._select_timeout())
        done: list[TaskResult] = []
        now = time.monotonic()
        for key, mask in events:
            if key.data is None:  # the wake-up fd: new tasks or kills from another thread
                self._woken()
                continue
            job: Job = key.data
            if key.fd == job.exit_fd and job.exit_fd in self._jobs:
                done.append(self._finish(job))
            elif key.fd == job.result_fd and mask & selectors.EVENT_READ:
                self._read_result(job)
            elif key.fd == job.control_fd and mask & selectors.EVENT_WRITE:
                self._write_go(job, now)
            elif key.fd == job.sandbox.event_fd:
                reason = job.sandbox.on_event()
                if reason is not None:
                    self._kill(job, reason)
        for job in list(self._jobs.values()):
            if job.deadline is not None and now >= job.deadline:
                self._kill(job, KillReason.TIMEOUT)
            elif job.cpu_deadline is not None and now >= job.cpu_deadline:
                spent, job.cpu_deadline = self.cpu_budget.check(job.sandbox, now)
                if spent:
                    self._kill(job, KillReason.CPU_TIME)
            elif job.next_poll is not None and now >= job.next_poll:
                reason = job.sandbox.poll()
                if reason is not None:
                    self._kill(job, reason)
                else:
                    job.next_poll = now + (job.sandbox.poll_interval_seconds or 0.05)
        return done

    def _select_timeout(self) -> float | None:
        moments = [
            moment
            for job in self._jobs.values()
            for moment in (job.deadline, job.cpu_deadline, job.next_poll)
            if moment is not None
        ]
        if not moments:
            return None
        return max(0.0, min(moments) - time.monotonic())

    def set_wakeup(self, fd: int, callback: Callable[[], None]) -> None:
        """Also watch ``fd``: another thread (``SandboxExecutor.submit``) writes a byte to it
        to end a ``select()``; the loop then calls ``callback`` in its own thread, which
        drains the fd and may queue tasks (``pending``) or ``cancel`` one. Before ``results()``.
        """
        self._wakeup = (fd, callback)

    def _woken(self) -> None:
        assert self._wakeup is not None
        self._wakeup[1]()  # the callback drains the fd: only its owner knows what it is

    def cancel(self, task: Task) -> bool:
        """Kill the running job of ``task`` (``KillReason.CANCELLED``); False if none runs it.

        From the loop's own thread only (the executor's wake-up callback): its result still
        comes out of ``results()``, classified as cancelled.
        """
        for job in self._jobs.values():
            if job.task is task:
                self._kill(job, KillReason.CANCELLED)
                return True
        return False

    # ------------------------------------------------------------------ launching

    def _fill_slots(self) -> list[TaskResult]:
        """Launch what fits; a task whose worker could not be started (its sandbox, its
        zygote, the fork) gets its failed result here, and its neighbours go on: one task's
        start never raises out of the loop (but a KeyboardInterrupt, SystemExit...)."""
        count = min(len(self.pending), self.max_workers - len(self._jobs))
        if count <= 0:
            return []
        started = time.time()
        if not self._backend_open:
            try:
                self.backend.open()
            except Exception as error:  # the next batch tries again: it may be transient
                log.warning("the %s backend could not open (%s: %s); %d task(s) fail without"
                            " running", self.backend.name, type(error).__name__, error,
                            count)  # fmt: skip
                return [self._start_failed(self.pending.popleft()[0], error, started)
                        for _ in range(count)]  # fmt: skip
            self._backend_open = True
        free = self.max_workers - len(self._jobs) - count
        failed: list[TaskResult] = []
        ready: list[tuple[Task, bytes, Sandbox]] = []
        try:
            for _ in range(count):
                task, payload = self.pending.popleft()
                try:
                    ready.append((task, payload, self._new_sandbox()))
                except Exception as error:
                    failed.append(self._start_failed(task, error, started))
            # The zygotes these slots need start side by side, before any of these tasks runs:
            # one started while a task runs would stop the loop (and that task's clock) meanwhile.
            try:
                if ready:
                    sandboxes = [sandbox for _, _, sandbox in ready]
                    work = [(task, payload) for task, payload, _ in ready]
                    self.launcher.prepare(sandboxes, work, free)
            except Exception as error:  # each launch below starts what it lacks, or fails alone
                log.warning("preparing %d launch(es) failed (%s: %s); each task's launch tries"
                            " on its own", len(ready), type(error).__name__, error)  # fmt: skip
            while ready:
                task, payload, sandbox = ready.pop(0)
                result = self._launch(task, payload, sandbox)
                if result is not None:
                    failed.append(result)
        finally:
            for _, _, unused in ready:  # a KeyboardInterrupt left them unlaunched
                unused.remove()
        return failed

    def _start_failed(self, task: Task, error: Exception, started: float) -> TaskResult:
        log.warning("%r could not be started (%s: %s); it fails without running", task,
                    type(error).__name__, error)  # fmt: skip
        return outcome.start_failure(task, error, self.terms, started)

    def _new_sandbox(self) -> Sandbox:
        if self.launcher.born_in_place:
            return self.backend.slot_sandbox(self.terms.limits)
        return self.backend.sandbox(self.terms.limits)

    def _launch(self, task: Task, payload: bytes, sandbox: Sandbox) -> TaskResult | None:
        """Start ``task``'s worker; its failed result if that could not be done, else None."""
        started = time.time()
        try:
            job = self.launcher.launch(
                task, payload, sandbox, self.terms.limits.cpu_time_seconds, self._jobs.values()
            )
        except BaseException as error:
            sandbox.remove()
            if not isinstance(error, Exception):  # Ctrl-C, SystemExit: the manager aborts
                raise
            return self._start_failed(task, error, started)
        self._jobs[job.exit_fd] = job  # from here on, abort() kills it (by pid too)
        self._selector.register(job.exit_fd, selectors.EVENT_READ, job)
        self._selector.register(job.result_fd, selectors.EVENT_READ, job)
        pid = job.process.pid
        assert pid is not None  # started
        try:
            sandbox.attach(pid)
        except Exception as error:
            # The worker is still waiting for the go frame, so no task code ran.
            job.error = error
            log.warning("%r: could not attach pid %s to its sandbox: %s; the task fails"
                        " without running", task, pid, error)  # fmt: skip
            self._kill(job, KillReason.ATTACH)
            try:
                job.process.kill()
            except OSError as kill_error:  # already gone: its exit event reports it
                log.debug("%r: kill after a failed attach: %s", task, kill_error)
            return None
        if sandbox.event_fd is not None:
            self._selector.register(sandbox.event_fd, selectors.EVENT_READ, job)
        now = time.monotonic()
        if job.go_frame is None:
            self._arm(job, now)
            return None
        self._write_go(job, now)
        if job.go_frame is not None:
            self._selector.register(job.control_fd, selectors.EVENT_WRITE, job)
        return None

    def _write_go(self, job: Job, now: float) -> None:
        if job.go_frame is None:
            return
        try:
            written = transport.write(job.control_fd, job.go_frame)
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

    def _arm(self, job: Job, now: float) -> None:
        """The worker may now run task code: start its clocks and its polling."""
        if self.terms.limits.wall_time_seconds is not None:
            job.deadline = now + self.terms.limits.wall_time_seconds
        job.cpu_deadline = self.cpu_budget.first_deadline(now)
        if job.sandbox.poll_interval_seconds is not None:
            job.next_poll = now

    # ------------------------------------------------------------------ ending a job

    def _close_control(self, job: Job) -> None:
        if job.control_fd < 0:
            return
        with contextlib.suppress(KeyError):  # not registered: the go frame went in one write
            self._selector.unregister(job.control_fd)
        transport.close(job.control_fd)
        job.control_fd = -1

    def _read_result(self, job: Job) -> None:
        if job.reader.feed(job.result_fd):
            self._stop_reading(job)

    def _stop_reading(self, job: Job) -> None:
        if job.result_fd < 0:
            return
        self._selector.unregister(job.result_fd)
        transport.close(job.result_fd)
        job.result_fd = -1

    def _kill(self, job: Job, reason: KillReason | str) -> None:
        if job.kill_reason is None:
            job.kill_reason = KillReason(reason)
        log.debug("%r: killing pid %s (%s)", job.task, job.process.pid, job.kill_reason)
        job.deadline = None
        job.cpu_deadline = None
        job.next_poll = None
        # The tree is read before anything dies: once the worker is gone its orphans move to
        # init, out of reach. The sandbox kill alone is not enough: a process that wrote itself
        # into another cgroup is not in the sandbox any more, and the manager would wait on it.
        tree = _descendants(job.process.pid)
        try:
            job.sandbox.kill()
        finally:
            _kill_by_pid(job)
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()  # psutil checks the creation time: no recycled pid is hit

    def _finish(self, job: Job) -> TaskResult:
        """The worker process has ended: collect everything and build its one result."""
        job.end_time = time.time()
        for fd in (job.exit_fd, job.sandbox.event_fd):
            if fd is not None:
                with contextlib.suppress(KeyError):  # the event fd is only there after attach
                    self._selector.unregister(fd)
        del self._jobs[job.exit_fd]
        usage: Usage | None
        try:
            # Leftover grandchildren die first, so nothing else writes into the result pipe.
            usage = job.sandbox.collect()
        except Exception as error:
            usage = None
            log.warning("%r: reading the sandbox's counters failed (%s: %s); its result has"
                        " the worker's own ru_maxrss and CPU time only (no peak at all if its"
                        " result frame is missing too)", job.task,
                        type(error).__name__, error)  # fmt: skip
        finally:
            job.sandbox.remove()
        if job.result_fd >= 0:
            self._read_result(job)
            self._stop_reading(job)
        self._close_control(job)
        transport.close(job.exit_fd)
        job.process.join()
        exit_code = job.process.exitcode
        job.process.close()
        return outcome.build_result(job, usage, -9 if exit_code is None else exit_code, self.terms)

    # ------------------------------------------------------------------ shutting down

    def abort(self) -> None:
        """The with-body raised: kill what runs, drop what waits, release everything."""
        self.pending.clear()
        try:
            for job in list(self._jobs.values()):
                self._kill_logged(job)
            for job in list(self._jobs.values()):
                self._finish_logged(job)
        finally:
            self.close()

    def _kill_logged(self, job: Job) -> None:
        try:
            self._kill(job, KillReason.ABORT)
        except Exception as error:  # keep going: the other jobs must be killed too
            log.warning("%r: kill on abort failed (%s: %s); the backend's close() retries the"
                        " whole runner tree", job.task, type(error).__name__, error)  # fmt: skip

    def _finish_logged(self, job: Job) -> None:
        try:
            # Killed by pid as well as by its cgroup, so this returns at once; the bound only
            # guards against a process stuck in D state.
            job.process.join(timeout=2)
            self._finish(job)  # the result is dropped: the with-body's exception wins
        except Exception as error:
            log.warning(
                "%r: clean-up on abort failed (%s: %s); its fds or sandbox may leak until the"
                " backend closes", job.task, type(error).__name__, error,
            )  # fmt: skip

    def close(self) -> None:
        if self._selector_made is not None:
            self._selector_made.close()
            self._selector_made = None
        if self._backend_open:
            self._backend_open = False
            try:
                self.launcher.close()  # the zygotes living in the backend's slots go first
            finally:
                self.backend.close()
