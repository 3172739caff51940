"""What runs inside the task's fresh process, from the handshake to ``os._exit``.

The worker does nothing of the task's until the manager has put it inside its sandbox and sent
the go frame, so no task code (not even unpickling the task's arguments) ever runs outside the
limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import traceback
from typing import Any

from . import _header, _linux
from . import _protocol as protocol
from . import _transport as transport
from ._backends.base import WorkerOptions
from ._isolation import Isolation
from ._task import Task

if sys.platform != "win32":
    import resource  # no RLIMIT_CPU on Windows: the psutil monitor polls the CPU time


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process is started with (built by ``_launch``, read here only)."""

    control: transport.Channel | None  # the go frame (the task under spawn/forkserver); None: none
    result: transport.Channel  # where the one result frame goes
    task: Task | None  # fork only; otherwise it arrives pickled in the go frame
    enter_files: tuple[str, ...]  # cgroup.procs files to write "0" into, first thing
    options: WorkerOptions
    cpu_time_seconds: float | None  # RLIMIT_CPU allowance for the task code
    foreign_fds: tuple[int, ...]  # fork only: the manager's fds of other jobs, closed at once
    manager_pid: int | None  # None under forkserver (our parent is the server)
    # Close every inherited fd but ours: only where the manager watches our exit through a
    # pidfd (a sentinel pipe's write end is one of the fds we inherited, and closing it would
    # tell the manager we ended). Elsewhere only foreign_fds are closed.
    close_inherited_fds: bool = False
    # The task's isolation profile and worker slot (its uid under "strict"); None: none.
    isolation: Isolation | None = None
    slot: int = 0
    # False where our parent's death already ends us: the zygote's PID 2 in its own PID
    # namespace, which dies with its PID 1 (a prctl less per task: it cost ~25 page faults).
    die_with_parent: bool = True
    # True under the zygote: the namespaces and mounts are built (_zygote/reaper.py); only the
    # privileges are dropped here.
    isolation_prepared: bool = False
    # The task's environment (_isolation/environment.py), set before its code; None: the
    # zygote's, which was exec'd with it.
    environment: dict[str, str] | None = None


def _read_exactly(control: transport.Channel, size: int) -> bytes:
    data = transport.read_exactly(control, size)
    if data is None:  # the manager is gone or gave up on us: nothing to do
        os._exit(protocol.EXIT_MANAGER_GONE)
    return data


def read_go_frame(control: transport.Channel) -> bytes:
    """Wait for the go frame and return its payload (the pickled task, or nothing)."""
    (length,) = protocol.LENGTH.unpack(_read_exactly(control, protocol.LENGTH.size))
    payload = _read_exactly(control, length) if length else b""
    control.close()
    return payload


def _die_with_manager(manager_pid: int | None) -> None:
    # If the manager is SIGKILLed, nobody enforces the wall-clock limit any more: take the task
    # down with it rather than leave it running unwatched. Checked after arming, since the
    # manager may have died before prctl.
    _linux.die_with_parent()
    if manager_pid is not None and os.getppid() != manager_pid:
        os._exit(protocol.EXIT_MANAGER_GONE)


def _set_cpu_limit(seconds: float) -> None:
    # RLIMIT_CPU counts the whole process's CPU time; add what the bootstrap already used so the
    # task gets its full allowance. Soft limit -> SIGXCPU, hard limit one second later -> SIGKILL
    # (a task that catches SIGXCPU still dies).
    if sys.platform != "win32":  # no RLIMIT_CPU there: the psutil monitor polls the tree
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + seconds + 0.999)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


def _set_process_limit(count: int, result: transport.Channel) -> None:
    # Sent only to a task that runs as a uid of its own (_launch): RLIMIT_NPROC counts every
    # process and thread of the real uid. Hard = soft: the task cannot raise it again.
    if sys.platform != "win32":
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (count, count))
        except (OSError, ValueError) as error:
            refuse(f"RLIMIT_NPROC={count}: {error}", result)


def _kill_descendants() -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.suspend()
        for child in psutil.Process().children(recursive=True) + children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=1)


def _usage() -> tuple[int, float]:
    if sys.platform != "win32":
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        max_rss = max(me.ru_maxrss, kids.ru_maxrss) * unit
        return max_rss, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    import psutil  # no getrusage: the peak working set and CPU time of this process

    process = psutil.Process()
    times = process.cpu_times()
    return int(getattr(process.memory_info(), "peak_wset", 0)), times.user + times.system


def _pickle_outcome(
    outcome: BaseException | Any, raised: bool
) -> tuple[protocol.Header, protocol.Chunks]:
    if not raised:
        try:
            return protocol.Header(protocol.RETURNED), protocol.pickle_parts(outcome)
        except BaseException as error:
            return _describe(protocol.RESULT_UNPICKLABLE, outcome, error), protocol.Chunks()
    tb = "".join(traceback.format_exception(type(outcome), outcome, outcome.__traceback__))
    try:
        body = protocol.pickle_parts(outcome)
        pickle.loads(b"".join(body.parts))  # exceptions often pickle but fail to unpickle
    except BaseException as error:
        header = _describe(protocol.EXCEPTION_UNPICKLABLE, outcome, error)
        header.traceback_text = tb
        return header, protocol.Chunks()
    return protocol.Header(protocol.RAISED, traceback_text=tb), body


def _describe(kind: str, value: object, error: BaseException) -> protocol.Header:
    cls = type(value)
    try:
        text = str(value)[:10_000]
    except BaseException:
        text = "<str() failed>"
    return protocol.Header(
        kind,
        type_name=f"{cls.__module__}.{cls.__qualname__}",
        text=text,
        traceback_text=f"{type(error).__name__}: {error}",
    )


def refuse(text: str, result: transport.Channel) -> None:
    """Report that the sandbox could not be set up, and stop before any task code."""
    head = _header.encode(protocol.Header(protocol.ENTER_FAILED, text=text))
    with contextlib.suppress(OSError):
        transport.write_all(result, protocol.RESULT_PREFIX.pack(len(head), 0) + head)
    os._exit(protocol.EXIT_ENTER_FAILED)


def enter_cgroups(files: tuple[str, ...]) -> str | None:
    """Move this process into its cgroups (``cgroup.procs`` files); what failed, or None."""
    for path in files:
        try:
            fd = os.open(path, os.O_WRONLY)  # closed at once: no O_CLOEXEC (none on Windows)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as error:
            return f"{path}: {error}"
    return None


def enter_sandbox(files: tuple[str, ...], result: transport.Channel) -> None:
    """Move this process into its cgroups; on failure report it and stop before any task code."""
    failure = enter_cgroups(files)
    if failure is not None:
        refuse(failure, result)


def isolate_namespaces(
    profile: Isolation,
    result: transport.Channel,
    own_pid_namespace: bool,
    trees: tuple[tuple[str, int, str | None], ...] = (),
    shm_bytes: int | None = None,
) -> None:
    """The zygote's PID 2 (root, in the task's cgroups and pid namespace, alone): namespaces and
    mounts, before the task's code; on failure report it and stop before any task code.
    ``trees``: the handed paths' idmapped copies (``_isolation/_idmap.py``)."""
    if sys.platform.startswith("linux"):
        from . import _isolation

        try:
            _isolation.setup_namespaces_and_mounts(profile, own_pid_namespace, trees, shm_bytes)
        except OSError as error:
            refuse(str(error), result)


def isolate_cgroups(profile: Isolation, result: transport.Channel) -> None:
    """The zygote's PID 2, placed by now (born in place, or a parent-side attach came before
    the go frame): the task's own cgroup namespace; on failure, no task code."""
    if sys.platform.startswith("linux"):
        from . import _isolation

        try:
            _isolation.isolate_cgroups(profile)
        except OSError as error:
            refuse(f"isolation step 'cgroup namespace' failed: {error}", result)


def _isolate(spec: WorkerSpec) -> None:
    """Under fork/spawn the worker builds its namespaces and mounts itself; it is not PID 1 of
    a namespace of its own (the zygote's tasks are), so the host's /proc stays there. Called
    after the go frame: a parent-side attach has placed us by then, and the cgroup namespace
    must be rooted at the task's cgroup, not at the manager's."""
    if sys.platform.startswith("linux") and spec.isolation is not None:
        from . import _isolation

        profile = spec.isolation
        try:
            if not spec.isolation_prepared:
                _isolation.setup_namespaces_and_mounts(profile, own_pid_namespace=False)
                _isolation.isolate_cgroups(profile)
            _isolation.drop_privileges(profile, spec.slot)
        except OSError as error:
            refuse(str(error), spec.result)


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every fd but 0, 1, 2 and ``keep``: the task must hold nothing of the manager's.

    Under fork the worker inherits all the manager's fds: other jobs' pipes, the selector's
    epoll fd (the same open file description as the manager's: EPOLL_CTL_DEL from here would
    drop the manager's registrations and hang it), pidfds, and whatever the embedding server
    has open (journals, sockets, database handles). Spawn and forkserver children inherit less,
    but still multiprocessing's own fds (resource tracker, forkserver sentinels). os.closerange
    is close_range(2) on Linux 5.9+: one syscall whatever the table size.
    """
    start = 3
    for fd in sorted(keep):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    os.closerange(start, _MAX_FD)
    # multiprocessing's resource tracker (a pipe to the manager's tracker process): its fd is
    # closed now, so forget it; if the task uses shared memory, it starts its own tracker.
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        with contextlib.suppress(AttributeError):
            tracker._resource_tracker._fd = None
            tracker._resource_tracker._pid = None


def _std_stream_fds() -> set[int]:
    """The fds behind sys.stdin/stdout/stderr when they are not 0-2 (pytest's capture, a
    server that redirected them): the task's prints must still go where the manager's go."""
    fds = set()
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            fds.add(stream.fileno())
    return fds


_MAX_FD = 2**31 - 1  # close_range(2) takes an unsigned int; Python's closerange clamps too


def main(spec: WorkerSpec) -> None:
    # Under fork we inherit the manager's ends of other tasks' pipes: untrusted code must not be
    # able to read another task's result or write into its handshake.
    for fd in spec.foreign_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    result_fd = spec.result.fileno()
    # ... and must not hold any other fd of the manager's either (its epoll fd, its journal).
    if spec.close_inherited_fds:
        keep = {result_fd} if spec.control is None else {result_fd, spec.control.fileno()}
        _close_inherited_fds(keep | _std_stream_fds())
    if spec.die_with_parent:
        _die_with_manager(spec.manager_pid)
    enter_sandbox(spec.enter_files, spec.result)
    if spec.options.subreaper:
        _linux.become_subreaper()
    payload = b""
    if spec.control is not None:  # wait for the go frame (and the task, under spawn/forkserver)
        payload = read_go_frame(spec.control)
    if spec.environment is not None:
        from ._isolation import replace_environment

        replace_environment(spec.environment)
    if spec.isolation is not None and spec.isolation.enabled:
        _isolate(spec)
    # From here on we are inside the sandbox.
    if spec.cpu_time_seconds is not None:
        _set_cpu_limit(spec.cpu_time_seconds)
    if spec.options.process_rlimit is not None:
        _set_process_limit(spec.options.process_rlimit, spec.result)

    # multiprocessing.Process.exitcode's rules, which Glasswall's users see: its worker catches
    # an Exception (exit 0); SystemExit gives its code; any other BaseException escapes the
    # target (KeyboardInterrupt: 1). The manager reads the process's real exit status.
    exit_code = 0
    raised = False
    outcome: Any
    task = spec.task
    try:
        if payload:
            task = pickle.loads(payload)
            del payload
        assert task is not None
        outcome = task.func(*task.args, **task.kwargs)
    except SystemExit as stop:
        outcome, raised = stop, True
        exit_code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:
        outcome, raised = error, True
        exit_code = 0 if isinstance(error, Exception) else 1

    if spec.options.kill_descendants_on_exit:
        _kill_descendants()
    header, body = _pickle_outcome(outcome, raised)
    del outcome
    header.max_rss_bytes, header.cpu_time_seconds = _usage()
    head = _header.encode(header)
    with contextlib.suppress(BrokenPipeError):
        transport.write_all(spec.result, protocol.RESULT_PREFIX.pack(len(head), body.size) + head)
        for part in body.parts:
            transport.write_all(spec.result, part)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_code)
