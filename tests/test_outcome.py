"""Unit tests of the pure parts between a worker's frame and its TaskResult: no processes.

Every case feeds a hand-made frame (or none) through a real pipe into the job's ResultReader,
then checks what ``_outcome.build_result`` and ``_outcome.classify`` make of it. The last section
runs real (trivial) workers under a fake backend whose counters cannot be read.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
from typing import Any

import pytest

import sandboxrun
from sandboxrun import Task, TaskResult, _header
from sandboxrun import _errors as errors
from sandboxrun import _outcome as outcome
from sandboxrun import _protocol as protocol
from sandboxrun import _transport as transport
from sandboxrun._backends.base import Backend, Sandbox, Usage
from sandboxrun._job import Job
from sandboxrun._limits import GIB, Limits
from sandboxrun._reasons import KillReason

MIB = 1024**2
TASK = Task(func=len, args=("x",))


class _NoSandbox(Sandbox):
    def kill(self) -> None:
        raise AssertionError("outcome must not touch the sandbox")

    def collect(self) -> Usage:
        raise AssertionError("outcome must not touch the sandbox")

    def remove(self) -> None:
        raise AssertionError("outcome must not touch the sandbox")


class _NoProcess:
    pid = 1
    exitcode = 0

    def start(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def kill(self) -> None: ...
    def close(self) -> None: ...


def frame(kind: str, body: Any = None, *, raw: bytes | None = None, **fields: Any) -> bytes:
    header = protocol.Header(kind, **fields)
    head = _header.encode(header)
    data = raw if raw is not None else (b"" if body is None else pickle.dumps(body, protocol=5))
    return protocol.RESULT_PREFIX.pack(len(head), len(data)) + head + data


def job_with(data: bytes | None, reason: KillReason | str | None = None) -> Job:
    job = Job(TASK, _NoSandbox(), _NoProcess())
    job.start_time, job.end_time = 100.0, 102.5
    job.kill_reason = None if reason is None else KillReason(reason)
    if data is not None:
        # Through the transport in use, so the portable pass reads with the portable one.
        read, writer = transport.result_pipe()
        try:
            transport.write_all(writer, data)
            writer.close()
            assert job.reader.feed(read)  # EOF reached
        finally:
            transport.close(read)
    return job


def terms(**kwargs: Any) -> outcome.Terms:
    limits = Limits.from_arguments(
        kwargs.get("worker_timeout_seconds"),
        kwargs.get("memory_limit_in_gib"),
        kwargs.get("cpu_time_limit_seconds"),
        kwargs.get("max_processes"),
    )
    return outcome.Terms(limits=limits, backend="fake", **kwargs)


RETURNED_42 = frame(protocol.RETURNED, 42, max_rss_bytes=30 * MIB, cpu_time_seconds=0.25)
RAISED_MEMORY = frame(protocol.RAISED, MemoryError("task's own"), traceback_text="tb")
RAISED_FORK = frame(protocol.RAISED, BlockingIOError(11, "fork refused"), traceback_text="tb")

# id: (frame, kill reason, usage, exit code, terms) -> expected fields and exception type
CASES: dict[str, tuple[Any, ...]] = {
    "returned": (RETURNED_42, None, Usage(peak_memory_bytes=50 * MIB), 0, terms(),
                 dict(success=True, result=42, exit_code=0), type(None)),
    "raised": (frame(protocol.RAISED, ValueError("bad"), traceback_text="Traceback: bad"),
               None, Usage(), 1, terms(), dict(success=False, result=None), ValueError),
    "timeout": (None, KillReason.TIMEOUT, Usage(), -9, terms(worker_timeout_seconds=1),
                dict(success=False, timed_out=True, out_of_memory=False), TimeoutError),
    "timeout beats the memory MemoryError": (
        RAISED_MEMORY, KillReason.TIMEOUT, Usage(memory_limit_hit=True), 1,
        terms(worker_timeout_seconds=1, memory_limit_in_gib=1, memory_hit_known=True),
        dict(timed_out=True, out_of_memory=False), TimeoutError),
    "polled memory kill": (None, KillReason.MEMORY, Usage(peak_memory_bytes=GIB), -9,
                           terms(memory_limit_in_gib=1),
                           dict(out_of_memory=True, timed_out=False), MemoryError),
    "kernel OOM kill": (None, None, Usage(oom_killed=True), -9, terms(memory_limit_in_gib=1),
                        dict(out_of_memory=True, exit_code=-9), MemoryError),
    "MemoryError, limit hit (kernel knows)": (
        RAISED_MEMORY, None, Usage(memory_limit_hit=True), 1,
        terms(memory_limit_in_gib=1, memory_hit_known=True),
        dict(out_of_memory=True, success=False), MemoryError),
    "MemoryError, limit never hit (kernel knows)": (
        RAISED_MEMORY, None, Usage(memory_limit_hit=False), 1,
        terms(memory_limit_in_gib=1, memory_hit_known=True),
        dict(out_of_memory=False, success=False), MemoryError),
    "MemoryError under a limit (psutil cannot know)": (
        RAISED_MEMORY, None, Usage(), 1, terms(memory_limit_in_gib=1),
        dict(out_of_memory=True), MemoryError),
    "MemoryError without a limit": (RAISED_MEMORY, None, Usage(memory_limit_hit=True), 1,
                                    terms(), dict(out_of_memory=False), MemoryError),
    "SIGXCPU under a CPU limit": (
        None, None, Usage(cpu_time_seconds=1.0), -signal.SIGXCPU,
        terms(cpu_time_limit_seconds=1), dict(cpu_time_limit_exceeded=True),
        errors.CpuTimeLimitExceeded),
    "SIGKILL well below the CPU limit": (
        None, None, Usage(cpu_time_seconds=0.1), -9, terms(cpu_time_limit_seconds=1),
        dict(cpu_time_limit_exceeded=False, exit_code=-9), errors.WorkerDied),
    "fork refused, task failed": (
        RAISED_FORK, None, Usage(process_limit_hit=True), 1, terms(max_processes=4),
        dict(process_limit_exceeded=True, success=False), errors.ProcessLimitExceeded),
    "fork refused, task coped": (
        RETURNED_42, None, Usage(process_limit_hit=True), 0, terms(max_processes=4),
        dict(process_limit_exceeded=False, success=True, result=42), type(None)),
    "polled process kill": (None, KillReason.PROCESSES, Usage(), -9, terms(max_processes=4),
                            dict(process_limit_exceeded=True), errors.ProcessLimitExceeded),
    "fork bomb that then timed out keeps both flags": (
        None, KillReason.TIMEOUT, Usage(process_limit_hit=True), -9,
        terms(worker_timeout_seconds=1, max_processes=4),
        dict(timed_out=True, process_limit_exceeded=True), TimeoutError),
    "attach failed": (None, KillReason.ATTACH, Usage(), -9, terms(),
                      dict(success=False, timed_out=False), errors.SandboxrunError),
    "cancelled while running": (None, KillReason.CANCELLED, Usage(), -9, terms(),
                                dict(success=False, timed_out=False, out_of_memory=False),
                                errors.TaskCancelled),
    "cancelled after it returned: still cancelled": (
        RETURNED_42, KillReason.CANCELLED, Usage(), -9, terms(),
        dict(success=False, result=None), errors.TaskCancelled),
    "died without a frame": (None, None, Usage(), 3, terms(),
                             dict(success=False, exit_code=3), errors.WorkerDied),
    "could not enter its sandbox": (
        frame(protocol.ENTER_FAILED, text="cgroup.procs: EACCES"), None, Usage(),
        protocol.EXIT_ENTER_FAILED, terms(), dict(success=False), errors.SandboxrunError),
    "result unpicklable in the worker": (
        frame(protocol.RESULT_UNPICKLABLE, type_name="builtins.function", text="<lambda>",
              traceback_text="PicklingError: no"), None, Usage(), 0, terms(),
        dict(success=False), errors.ResultNotPicklable),
    "exception unpicklable in the worker": (
        frame(protocol.EXCEPTION_UNPICKLABLE, type_name="x.E", text="e", traceback_text="tb"),
        None, Usage(), 1, terms(), dict(success=False), errors.ExceptionNotPicklable),
    "result that does not unpickle here": (
        frame(protocol.RETURNED, raw=b"\x80\x05garbage"), None, Usage(), 0, terms(),
        dict(success=False, result=None), errors.ResultNotPicklable),
    "raised a non-exception": (frame(protocol.RAISED, 7), None, Usage(), 1, terms(),
                               dict(success=False), errors.SandboxrunError),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_classification(case: str) -> None:
    data, reason, usage, exit_code, manager_terms, expected, error_type = CASES[case]
    result = outcome.build_result(job_with(data, reason), usage, exit_code, manager_terms)
    assert {name: getattr(result, name) for name in expected} == expected
    assert type(result.exception) is error_type or (
        error_type is not type(None) and isinstance(result.exception, error_type)
    )
    if not result.success:  # the TaskResult contract: never a failure without a why
        assert result.exception is not None
    assert result.elapsed_time == 2.5 and result.backend == "fake"


def test_the_task_s_own_exception_keeps_its_remote_traceback() -> None:
    data = frame(protocol.RAISED, ValueError("bad"), traceback_text="Traceback: line 1")
    result = outcome.build_result(job_with(data), Usage(), 1, terms())
    assert isinstance(result.exception.__cause__, errors.RemoteTraceback)
    assert "line 1" in str(result.exception.__cause__)


def test_refused_fork_is_the_cause_of_the_process_limit_error() -> None:
    result = outcome.build_result(job_with(RAISED_FORK), Usage(process_limit_hit=True), 1,
                                  terms(max_processes=4))  # fmt: skip
    assert isinstance(result.exception.__cause__, BlockingIOError)


def test_attach_error_is_named() -> None:
    job = job_with(None, "attach")  # a backend's bare string still converts
    job.error = PermissionError("cgroup.procs: denied")
    result = outcome.build_result(job, Usage(), -9, terms())
    assert "cgroup.procs: denied" in str(result.exception)


def test_cut_frame_is_a_transfer_error() -> None:
    whole = RETURNED_42
    result = outcome.build_result(job_with(whole[: len(whole) - 3]), Usage(), -9, terms())
    assert isinstance(result.exception, errors.WorkerDied)
    assert isinstance(result.exception.__cause__, errors.ResultTransferError)
    assert "cut off" in str(result.exception)


@pytest.mark.parametrize(
    ("usage", "data", "peak_gib", "cpu"),
    [
        (Usage(peak_memory_bytes=50 * MIB, cpu_time_seconds=0.5), RETURNED_42, 50 / 1024, 0.5),
        (Usage(peak_memory_bytes=10 * MIB), RETURNED_42, 30 / 1024, 0.25),  # ru_maxrss larger
        (None, RETURNED_42, 30 / 1024, 0.25),  # collect failed: the worker's own figures
        (None, None, None, None),  # collect failed and no frame: nothing measured at all
        (Usage(), None, None, None),  # a backend that measured nothing
    ],
)
def test_peak_and_cpu_time_sources(usage, data, peak_gib, cpu) -> None:
    result = outcome.build_result(job_with(data), usage, 0, terms())
    assert result.max_memory_used_in_gib == peak_gib
    assert result.cpu_time_used_seconds == cpu


def test_memory_message_names_the_peak_or_says_unknown() -> None:
    known = outcome.build_result(job_with(None, KillReason.MEMORY),
                                 Usage(peak_memory_bytes=GIB // 2), -9,
                                 terms(memory_limit_in_gib=0.25))  # fmt: skip
    assert "peak 0.500 GiB" in str(known.exception)
    unknown = outcome.build_result(job_with(None, KillReason.MEMORY), None, -9,
                                   terms(memory_limit_in_gib=0.25))  # fmt: skip
    assert "peak unknown" in str(unknown.exception)


# ---------------------------------------------------------------------- classify


def _result(**flags: Any) -> TaskResult:
    return TaskResult(task=TASK, **{"success": False, **flags})


@pytest.mark.parametrize(
    ("flags", "verdict", "label", "exit_code"),
    [
        (dict(success=True), outcome.Verdict.OK, "ok", None),
        (dict(), outcome.Verdict.FAILED, "failed", None),
        (dict(timed_out=True, process_limit_exceeded=True), outcome.Verdict.TIMED_OUT,
         "timed out", 124),
        (dict(out_of_memory=True), outcome.Verdict.OUT_OF_MEMORY, "out of memory", 123),
        (dict(cpu_time_limit_exceeded=True), outcome.Verdict.CPU_TIME_EXCEEDED, "failed", 122),
        (dict(process_limit_exceeded=True), outcome.Verdict.PROCESSES_EXCEEDED, "failed", 121),
    ],
)  # fmt: skip
def test_classify(flags, verdict, label, exit_code) -> None:
    got = outcome.classify(_result(**flags))
    assert got is verdict and got.label == label and got.exit_code == exit_code


def test_kill_reason_compares_with_the_backends_bare_strings() -> None:
    assert KillReason("memory") is KillReason.MEMORY
    assert KillReason.PROCESSES == "processes" and str(KillReason.TIMEOUT) == "timeout"


# ---------------------------------------------------------------------- ResultReader


@pytest.fixture
def pipe():
    if transport.NAME != "posix":  # raw fds read without blocking: the POSIX transport's reads
        pytest.skip("the raw-pipe reader tests need the posix transport")
    read, write = os.pipe()
    os.set_blocking(read, False)
    ends = {"read": read, "write": write}
    yield ends
    for fd in ends.values():
        if fd >= 0:
            os.close(fd)


def _close_writer(ends: dict[str, int]) -> None:
    os.close(ends["write"])
    ends["write"] = -1


def test_reader_reassembles_a_frame_written_in_pieces(pipe) -> None:
    data = frame(protocol.RETURNED, "hello" * 1000)
    reader = protocol.ResultReader()
    assert reader.feed(pipe["read"]) is False and not reader.started  # nothing yet
    for cut in (3, protocol.RESULT_PREFIX.size - 1, protocol.RESULT_PREFIX.size + 5, 4000):
        os.write(pipe["write"], data[:cut])
        data = data[cut:]
        assert reader.feed(pipe["read"]) is False and not reader.complete
    os.write(pipe["write"], data)
    assert reader.feed(pipe["read"]) is True and reader.complete
    taken = reader.take()
    assert taken is not None
    header, body = taken
    with body:
        assert header.kind == protocol.RETURNED and pickle.loads(body) == "hello" * 1000
    reader.close()


@pytest.mark.parametrize("keep", [0, 5, protocol.RESULT_PREFIX.size + 10])
def test_reader_eof_before_the_frame_is_complete(pipe, keep) -> None:
    os.write(pipe["write"], frame(protocol.RETURNED, b"x" * 100)[:keep])
    _close_writer(pipe)
    reader = protocol.ResultReader()
    assert reader.feed(pipe["read"]) is True  # EOF: nothing more will come
    assert reader.started == (keep > 0) and not reader.complete
    assert reader.take() is None


def test_reader_big_frame_lands_in_a_mapping(pipe) -> None:
    import mmap

    payload = os.urandom(3 * MIB)
    data = memoryview(frame(protocol.RETURNED, payload))
    os.set_blocking(pipe["write"], False)
    reader = protocol.ResultReader()
    done = False
    while data:  # one thread: write what the pipe takes, read what it holds
        with contextlib.suppress(BlockingIOError):
            data = data[os.write(pipe["write"], data) :]
        done = reader.feed(pipe["read"])
    _close_writer(pipe)
    done = done or reader.feed(pipe["read"])
    assert done and reader.complete and isinstance(reader.buffer, mmap.mmap)
    taken = reader.take()
    assert taken is not None
    with taken[1] as body:
        assert pickle.loads(body) == payload
    reader.close()
    assert reader.buffer is None


# ---------------------------------------------------------------------- a failed collect()


class _BrokenCounters(Sandbox):
    """The worker runs unconfined; reading the counters fails like a vanished cgroup would."""

    def kill(self) -> None: ...

    def collect(self) -> Usage:
        raise OSError(2, "No such file or directory", "memory.peak")

    def remove(self) -> None: ...


class _BrokenBackend(Backend):
    name = "broken"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def sandbox(self, limits: Limits) -> Sandbox:
        return _BrokenCounters()


def _exit_at_once() -> None:
    os._exit(0)


def test_failed_collect_is_logged_and_leaves_the_worker_s_own_peak(caplog) -> None:
    caplog.set_level("WARNING", logger="sandboxrun")
    with sandboxrun.ProcessManager(1, backend=_BrokenBackend(), start_method="fork",
                              isolation="none") as pm:
        pm.queue_task(Task(func=abs, args=(-3,)))
        pm.queue_task(Task(func=_exit_at_once))
    returned, died = pm.task_results
    assert returned.success and returned.result == 3
    assert returned.max_memory_used_in_gib is not None and returned.max_memory_used_in_gib > 0
    assert isinstance(died.exception, errors.WorkerDied)
    assert died.max_memory_used_in_gib is None  # nothing measured it: not a made-up 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("memory.peak" in text for text in warnings)


class _Unkillable(_BrokenCounters):
    def kill(self) -> None:
        raise PermissionError(13, "Permission denied", "cgroup.kill")

    def collect(self) -> Usage:
        return Usage()


class _UnkillableBackend(_BrokenBackend):
    def sandbox(self, limits: Limits) -> Sandbox:
        return _Unkillable()


def test_abort_logs_a_failed_kill_and_still_cleans_up(caplog) -> None:
    import time

    caplog.set_level("WARNING", logger="sandboxrun")
    pm = sandboxrun.ProcessManager(2, backend=_UnkillableBackend(), start_method="fork",
                                   isolation="none")
    # A KeyboardInterrupt: since issue 13 only a non-Exception aborts (an Exception lets the
    # queued work finish first).
    with pytest.raises(KeyboardInterrupt, match="the with-body's own"), pm:
        pm.queue_task(Task(func=abs, args=(-1,)))
        pm.queue_task(Task(func=time.sleep, args=(0.3,)))  # still running at the abort
        for _ in pm.as_completed():
            raise KeyboardInterrupt("the with-body's own")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "kill on abort failed" in warnings[0], warnings
    assert "cgroup.kill" in warnings[0]
    assert not pm._scheduler._jobs  # the sleeper was still joined and finished
