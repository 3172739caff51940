"""From what a finished job left behind to its one ``TaskResult``, and back to one ``Verdict``.

Pure logic (no processes, no fds but the reader's buffer), so every rule is unit-tested alone::

    job.reader --decode--> (header | None, value, exception)   (body: Terms.result_types)
    usage (None: collect failed)  ---+
    exit code, job.kill_reason    ---+--build_result--> TaskResult --classify--> Verdict
    Terms (the manager's limits)  ---+                                (exit code, batch label)

The first true condition wins, in this order: timeout, memory, CPU time, processes, attach
failure; then a refused or missing frame (ResultTooLarge, ProtocolError, WorkerDied), then
what the task itself returned or raised. A task whose worker never started (its sandbox could
not be made, its zygote died, the fork failed) has no job: ``start_failure`` gives its result.

Nothing here may raise because of what a worker sent: ``build_result`` turns any exception in
decoding or classifying one job into that job's failed result (and logs it), so one hostile
frame can never cost the batch its other results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import logging
import signal
import time
from typing import Any

from . import _protocol as protocol
from ._backends.base import Usage
from ._errors import (
    CpuTimeLimitExceeded,
    ExceptionNotPicklable,
    ProcessLimitExceeded,
    ProtocolError,
    RemoteTraceback,
    ResultDecodeError,
    ResultNotPicklable,
    ResultTransferError,
    ResultTypeRefused,
    SandboxrunError,
    TaskCancelled,
    WorkerDied,
)
from ._job import Job
from ._limits import DEFAULT_MAX_RESULT_BYTES, GIB, MIN_WORKER_MEMORY_BYTES, Limits
from ._reasons import KillReason
from ._result_types import ResultTypes
from ._task import Task, TaskResult

log = logging.getLogger("sandboxrun.outcome")

_SIGXCPU = int(getattr(signal, "SIGXCPU", 0)) or -1


@dataclasses.dataclass(frozen=True)
class Terms:
    """What one manager promised every task: its limits as given, and who enforces them."""

    limits: Limits
    worker_timeout_seconds: float | None = None
    memory_limit_in_gib: float | None = None
    cpu_time_limit_seconds: float | None = None
    max_processes: int | None = None
    backend: str = ""
    #: The backend really knows whether the memory limit was hit (``Usage.memory_limit_hit``);
    #: False for the psutil backend, which only samples.
    memory_hit_known: bool = False
    #: The backend's CPU time is the kernel's count for the whole tree (else a polled sample,
    #: which misses what a process used after the last poll before it ended).
    cpu_time_known: bool = False
    #: How a result body is decoded (the restricted unpickler unless trusted_results=True).
    result_types: ResultTypes = dataclasses.field(default_factory=ResultTypes)
    #: The longest result body the manager reads (the reader's cap, for the record).
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    #: The isolation profile in force (TaskResult.isolation).
    isolation: str = ""


# ---------------------------------------------------------------------- decoding the frame


def decode(
    job: Job, result_types: ResultTypes
) -> tuple[protocol.Header | None, Any, BaseException | None]:
    """(header, returned value, exception) from the job's frame. The header is None when no
    valid frame came: then the exception says why (refused frame, bad header), or is None
    (no frame, or a cut one: the caller reports WorkerDied)."""
    if job.reader.error is not None:
        return None, None, job.reader.error
    try:
        frame = job.reader.take()
        if frame is None:
            return None, None, None
        header, body = frame
        with body:
            value, exception = interpret(header, body, result_types)
        return header, value, exception
    except ProtocolError as error:
        return None, None, error
    finally:
        job.reader.close()


def interpret(
    header: protocol.Header, body: memoryview, result_types: ResultTypes | None = None
) -> tuple[Any, BaseException | None]:
    """(returned value, exception) from a frame whose header arrived."""
    if header.kind == protocol.ENTER_FAILED:
        text = f"the worker could not enter its sandbox, no task code ran: {header.text}"
        return None, SandboxrunError(text)
    raised = header.kind in (protocol.RAISED, protocol.EXCEPTION_UNPICKLABLE)
    what = "exception" if raised else "result"
    kind = ExceptionNotPicklable if raised else ResultNotPicklable
    if header.kind in (protocol.RESULT_UNPICKLABLE, protocol.EXCEPTION_UNPICKLABLE):
        text = (
            f"the task's {what} ({header.type_name}: {header.text:.200}) cannot be pickled:"
            f" {header.traceback_text.splitlines()[-1] if header.traceback_text else ''}"
        )
        return None, kind(text, header.type_name, header.text, header.traceback_text)
    try:
        value = (result_types or ResultTypes()).loads(body)
    except ResultTypeRefused as refused:
        return None, refused
    except ResultDecodeError as error:
        text = f"the task's {what} could not be unpickled here: {error}"
        failure = kind(text, type(error).__name__, str(error), header.traceback_text)
        failure.__cause__ = error
        return None, failure
    if header.kind != protocol.RAISED:
        return value, None
    if isinstance(value, BaseException):
        value.__cause__ = RemoteTraceback(header.traceback_text)
        return None, value
    # Name the type only: a decoded value's repr() is the task's code or a deep structure.
    return None, SandboxrunError(f"worker sent a non-exception: a {type(value).__name__}")


# ---------------------------------------------------------------------- classifying


@dataclasses.dataclass
class _Facts:
    """Everything the verdict rules look at, gathered once."""

    header: protocol.Header | None
    exception: BaseException | None
    usage: Usage
    exit_code: int
    reason: KillReason | None
    peak_bytes: int | None
    cpu_time: float | None


def peak_bytes(usage: Usage | None, header: protocol.Header | None) -> int | None:
    """The larger of the sandbox's peak and the worker's ru_maxrss; None if neither exists."""
    measured = [
        value
        for value in (
            None if usage is None else usage.peak_memory_bytes,
            None if header is None else header.max_rss_bytes,
        )
        if value is not None
    ]
    return max(measured) if measured else None


def _out_of_memory(facts: _Facts, terms: Terms) -> bool:
    if facts.reason == KillReason.MEMORY:
        return True
    if facts.reason == KillReason.TIMEOUT:
        return False
    if facts.usage.oom_killed:
        return True
    # A MemoryError counts as the limit's doing only under a limit, and, where the backend
    # knows, only when the limit was really reached (else the task raised it, or asked more of
    # the machine than it has, which the limit did not cause).
    return (
        terms.limits.memory_bytes is not None
        and isinstance(facts.exception, MemoryError)
        and (facts.usage.memory_limit_hit or not terms.memory_hit_known)
    )


def _cpu_exceeded(facts: _Facts, terms: Terms) -> bool:
    if facts.reason == KillReason.CPU_TIME:  # the tree's counter reached the budget
        return True
    # RLIMIT_CPU, per process: SIGXCPU at the soft limit, SIGKILL at the hard one.
    limit = terms.limits.cpu_time_seconds
    return (
        limit is not None
        and facts.exit_code in (-_SIGXCPU, -9)
        and (facts.cpu_time is None or facts.cpu_time >= limit * 0.9)
    )


def _succeeded(facts: _Facts) -> bool:
    header = facts.header
    return header is not None and header.kind == protocol.RETURNED and facts.exception is None


@dataclasses.dataclass(frozen=True)
class Flags:
    """The TaskResult's limit flags. Several may be true (a fork bomb that then timed out);
    the first true one, in field order, makes the exception."""

    timed_out: bool
    out_of_memory: bool
    cpu_time_limit_exceeded: bool
    process_limit_exceeded: bool
    attach_failed: bool


def _refused_a_process(error: BaseException | None) -> bool:
    """The task failed because a new thread or process was refused (EAGAIN): under the psutil
    backend with RLIMIT_NPROC (``WorkerOptions.process_rlimit``) that is the limit, which
    leaves no other record (pids.max counts its refusals in pids.events)."""
    if isinstance(error, RuntimeError) and "can't start new thread" in str(error):
        return True
    return isinstance(error, OSError) and error.errno == errno.EAGAIN


def _flags(facts: _Facts, terms: Terms) -> Flags:
    timed_out = facts.reason == KillReason.TIMEOUT
    out_of_memory = _out_of_memory(facts, terms)
    return Flags(
        timed_out=timed_out,
        out_of_memory=out_of_memory,
        cpu_time_limit_exceeded=not timed_out and not out_of_memory and _cpu_exceeded(facts, terms),
        # pids.max makes fork() fail instead of killing: a task that hit it and then failed
        # failed because of it; one that coped with it (and succeeded) did not exceed anything.
        process_limit_exceeded=facts.reason == KillReason.PROCESSES
        or (facts.usage.process_limit_hit and not _succeeded(facts)),
        attach_failed=facts.reason == KillReason.ATTACH,
    )


def _verdict_error(facts: _Facts, flags: Flags, terms: Terms, job: Job) -> BaseException | None:
    """The limit (or launch) failure that decides the result, or None when none applies."""
    if flags.timed_out:
        return TimeoutError(
            f"the task ran longer than worker_timeout_seconds={terms.worker_timeout_seconds}"
            " and was killed with its whole process tree"
        )
    if flags.out_of_memory:
        if isinstance(facts.exception, MemoryError):
            return facts.exception
        peak = "unknown" if facts.peak_bytes is None else f"{facts.peak_bytes / GIB:.3f} GiB"
        hint = memory_too_small(terms.limits)
        return MemoryError(
            f"the task exceeded memory_limit_in_gib={terms.memory_limit_in_gib}"
            f" (peak {peak}) and was killed{'; ' + hint if hint else ''}"
        )
    if flags.cpu_time_limit_exceeded:
        used = "" if facts.cpu_time is None else f" ({facts.cpu_time:.3f} s of CPU used)"
        return CpuTimeLimitExceeded(
            f"the task used more than cpu_time_limit_seconds={terms.cpu_time_limit_seconds}"
            f"{used} and was killed with its whole process tree"
        )
    if flags.process_limit_exceeded:
        error = ProcessLimitExceeded(
            f"the task ran more than max_processes={terms.max_processes} processes"
        )
        error.__cause__ = facts.exception  # keep what the task itself raised (the refused fork)
        return error
    if flags.attach_failed:
        return SandboxrunError(f"could not place the worker in its sandbox: {job.error}")
    if facts.reason == KillReason.CANCELLED:
        return TaskCancelled("the task was cancelled while it ran; its process tree was killed")
    return None


def memory_too_small(limits: Limits) -> str:
    """What to do when the memory limit is below what a worker needs to start; else ""."""
    memory = limits.memory_bytes
    if memory is None or memory >= MIN_WORKER_MEMORY_BYTES:
        return ""
    return (
        f"the memory limit {memory / 2**20:.3g} MiB is below what a worker needs to start"
        f" (~{MIN_WORKER_MEMORY_BYTES // 2**20} MiB): raise memory_limit_in_gib"
    )


def start_failure(task: Task, error: Exception, terms: Terms, start_time: float) -> TaskResult:
    """The one result of a task whose worker could not be started: no process of it ran task
    code, so no job exists (``exit_code`` None). ``error`` becomes the ``__cause__``."""
    what = f"{type(error).__name__}: {error}"
    hint = memory_too_small(terms.limits)
    if hint:
        what = f"{hint} ({what})"
    elif type(error).__name__ == "ZygoteError":  # not imported: Linux only, and the zygote's
        what += (
            " (the zygote's own error, if it printed one, is on this process's stderr;"
            " start_method='fork' starts tasks without a zygote)"
        )
    failure = SandboxrunError(f"the task's worker could not be started, no task code ran: {what}")
    failure.__cause__ = error
    end_time = time.time()
    return TaskResult(
        task=task,
        success=False,
        exception=failure,
        exit_code=None,
        timeout_seconds=terms.worker_timeout_seconds,
        memory_limit_in_gib=terms.memory_limit_in_gib,
        start_time=start_time,
        end_time=end_time,
        elapsed_time=end_time - start_time,
        max_memory_used_in_gib=None,
        backend=terms.backend,
        isolation=terms.isolation,
    )


def build_result(job: Job, usage: Usage | None, exit_code: int, terms: Terms) -> TaskResult:
    """The one ``TaskResult`` of a job whose process has ended (``usage`` None: collect failed).

    Never raises (but BaseExceptions of the manager's own, e.g. KeyboardInterrupt): whatever
    went wrong with this one job becomes its failed result.
    """
    try:
        return _build_result(job, usage, exit_code, terms)
    except Exception as error:
        log.warning("%r: building its result failed (%s: %s); the task is reported failed",
                    job.task, type(error).__name__, error)  # fmt: skip
        with contextlib.suppress(Exception):
            job.reader.close()
        failure = SandboxrunError(f"the task's result could not be built: {type(error).__name__}")
        failure.__cause__ = error
        return TaskResult(success=False, exception=failure, **_common(job, exit_code, terms))


def _common(job: Job, exit_code: int, terms: Terms) -> dict[str, Any]:
    """The TaskResult fields every result has, whatever happened."""
    return {
        "task": job.task,
        "exit_code": exit_code,
        "timeout_seconds": terms.worker_timeout_seconds,
        "memory_limit_in_gib": terms.memory_limit_in_gib,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "elapsed_time": job.end_time - job.start_time,
        "backend": terms.backend,
        "isolation": job.isolation or terms.isolation,
    }


def _cpu_time(usage: Usage | None, header: protocol.Header | None, terms: Terms) -> float | None:
    """The kernel's count where there is one; else the larger of the polled tree and the
    worker's own rusage (itself + its waited children), which the task could only inflate."""
    measured = None if usage is None else usage.cpu_time_seconds
    if measured is not None and terms.cpu_time_known:
        return measured
    reported = None if header is None else header.cpu_time_seconds
    found = [value for value in (measured, reported) if value is not None]
    return max(found) if found else None


def _build_result(job: Job, usage: Usage | None, exit_code: int, terms: Terms) -> TaskResult:
    header, value, exception = decode(job, terms.result_types)
    cpu_time = _cpu_time(usage, header, terms)
    usage = Usage() if usage is None else usage
    if job.process_rlimit and _refused_a_process(exception):
        usage = dataclasses.replace(usage, process_limit_hit=True)
    facts = _Facts(
        header=header,
        exception=exception,
        usage=usage,
        exit_code=exit_code,
        reason=job.kill_reason,
        peak_bytes=peak_bytes(usage, header),
        cpu_time=cpu_time,
    )
    success = _succeeded(facts)
    flags = _flags(facts, terms)
    verdict = _verdict_error(facts, flags, terms, job)
    if verdict is not None:
        success, exception = False, verdict
    elif header is None and exception is not None:  # a refused frame: ResultTooLarge, bad header
        success = False
    elif header is None:
        cut = job.reader.started
        exception = WorkerDied(exit_code, "its result was cut off mid-write" if cut else "")
        if cut:
            exception.__cause__ = ResultTransferError("incomplete result frame")
    elif not success and exception is None:  # defensive: never success=False without a why
        exception = SandboxrunError(f"task failed ({header.kind})")
    return TaskResult(
        success=success,
        result=value if success else None,
        exception=exception,
        timed_out=flags.timed_out,
        max_memory_used_in_gib=None if facts.peak_bytes is None else facts.peak_bytes / GIB,
        out_of_memory=flags.out_of_memory,
        cpu_time_used_seconds=cpu_time,
        cpu_throttled_periods=facts.usage.cpu_throttled_periods,
        cpu_throttled_seconds=facts.usage.cpu_throttled_seconds,
        cpu_time_limit_exceeded=flags.cpu_time_limit_exceeded,
        process_limit_exceeded=flags.process_limit_exceeded,
        **_common(job, exit_code, terms),
    )


# ---------------------------------------------------------------------- one verdict per result

EXIT_PROCESSES = 121
EXIT_CPU_TIME = 122
EXIT_OUT_OF_MEMORY = 123
EXIT_TIMEOUT = 124


class Verdict(str, enum.Enum):
    """The one classification of a finished ``TaskResult`` (``classify``), shared by the CLI's
    exit codes and the batch journal's verdicts."""

    OK = "ok"
    TIMED_OUT = "timed out"
    OUT_OF_MEMORY = "out of memory"
    CPU_TIME_EXCEEDED = "cpu time exceeded"
    PROCESSES_EXCEEDED = "processes exceeded"
    FAILED = "failed"

    @property
    def label(self) -> str:
        """The batch journal's word: ``ok``, ``timed out``, ``out of memory`` or ``failed``."""
        if self in (Verdict.CPU_TIME_EXCEEDED, Verdict.PROCESSES_EXCEEDED):
            return "failed"
        return str(self.value)

    @property
    def exit_code(self) -> int | None:
        """The runner's own exit code (above 120, like timeout(1)) for a limit verdict; None
        for OK and FAILED, whose code comes from the task itself (its command, its signal)."""
        return _EXIT_CODES.get(self)


_EXIT_CODES = {
    Verdict.TIMED_OUT: EXIT_TIMEOUT,
    Verdict.OUT_OF_MEMORY: EXIT_OUT_OF_MEMORY,
    Verdict.CPU_TIME_EXCEEDED: EXIT_CPU_TIME,
    Verdict.PROCESSES_EXCEEDED: EXIT_PROCESSES,
}


def classify(result: TaskResult) -> Verdict:
    """Which limit ended the task, else whether it succeeded (the flags' order of precedence)."""
    if result.timed_out:
        return Verdict.TIMED_OUT
    if result.out_of_memory:
        return Verdict.OUT_OF_MEMORY
    if result.cpu_time_limit_exceeded:
        return Verdict.CPU_TIME_EXCEEDED
    if result.process_limit_exceeded:
        return Verdict.PROCESSES_EXCEEDED
    return Verdict.OK if result.success else Verdict.FAILED
