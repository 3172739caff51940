"""PID 1 and PID 2 of a task's namespace: a small reaper, and the task below it.

Why a reaper and not the task as PID 1 (pid_namespaces(7)): the kernel drops every signal PID 1
has no handler for, also the ones it sends itself, so a task that is PID 1 survives its own
``os.kill(os.getpid(), SIGKILL)``, ``os.abort()`` ends as SIGSEGV, and a default SIGTERM does
nothing -- the fault matrix would change meaning. bubblewrap keeps a reaper as PID 1 for the same
reason. Here the task is PID 2, with ordinary signal semantics; PID 1 waits for it, reaping the
namespace's orphans on the way, and hands its status to the zygote before it exits. Its exit
SIGKILLs whatever is left in the namespace: no setsid, double fork or subreaper trick outlives it.

PID 1 does as little as it can, in this order (each step before the next for a reason):
  1. close the zygote's fds        the task must not talk to the zygote or read other statuses
  2. PR_SET_PDEATHSIG              a dead zygote takes the namespace with it
  3. enter the cgroups             before anything of the task's exists (PID 2 is born inside)
  4. [wait for the go frame]       only when the manager places PID 1 itself (a parent-side
                                   attach): readable means placed, so PID 2 is born placed
  5. fork PID 2; close the task's fds; wait; write PID 2's status; _exit
PID 2, before ``_worker.main`` (which reads the go frame, drops the privileges, runs the task):
  stdio, cwd, oom_score_adj=1000, then the namespaces and mounts and the cgroup namespace
  (_isolation) while it is root and alone in its PID namespace, placed by then.

PID 1 runs no Python where ``sandboxrun._native`` is built (``_native.c``): a Python PID 1
paid the interpreter's after-fork work and a copy-on-write fault per page it wrote -- 1.35 to
1.5 ms of CPU and 450 to 500 faults per task measured, a third of a launch. Without a compiler
the same steps run here in Python (``SANDBOXRUN_NATIVE=0`` selects this path on purpose).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # mypy --platform win32/darwin skips the rest

import dataclasses
import os
import select
import signal
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from .. import _linux, _worker
from .. import _protocol as protocol
from .. import _transport as transport
from . import wire

if TYPE_CHECKING:
    from .server import Request

from types import ModuleType

_native: ModuleType | None
try:
    from .. import _native
except ImportError:  # not built (no compiler): the Python PID 1 below
    _native = None


#: ``_native.watch`` (server.Server.watch in C), or None.
native_watch = None if _native is None else getattr(_native, "watch", None)


def native_available() -> bool:
    return _native is not None


def fork(
    request: Request,
    fds: list[int],
    status_w: int,
    close: tuple[int, ...],
    zygote: int,
    helper: int = -1,
    native: bool = True,
    own_pid_namespace: bool = True,
) -> int:
    """Fork the task's PID 1 (which forks PID 2); returns PID 1's pid, here only.

    ``fds``: the task's result and control fds, then its stdio (``request.stdio``); ``close``:
    the caller's own fds, which neither PID 1 nor the task may hold; ``zygote``: the zygote's
    pidfd, which tells PID 1 whether the zygote died before its death signal was set (its
    getppid() is 0 in its namespace: no use); ``helper``: the caller's pidfd when it is a
    short-lived helper, PID 1 becoming the zygote's child once it is gone (a non-root zygote,
    ``server.fork_through_helper``); ``own_pid_namespace``: whether the caller unshared a PID
    namespace for it (PID 2 then mounts the task's own /proc)."""
    if native and _native is not None:
        pid, failed, error = _native.fork_reaper(
            close, request.enter_files, fds[1], not request.fork_before_go, status_w,
            zygote, helper)  # fmt: skip
        if pid != 0:
            return int(pid)
        failure = _entered(request, failed, error)
        _run_task(request, fds, status_w, failure, own_pid_namespace, True)  # PID 2
    pid = os.fork()
    if pid == 0:
        _python_pid1(request, fds, status_w, close, zygote, helper, own_pid_namespace)
    return pid


def _entered(request: Request, failed: int, error: int) -> str | None:
    if failed < 0:
        return None
    return f"{request.enter_files[failed]}: {OSError(error, os.strerror(error))}"


def _python_pid1(
    request: Request,
    fds: list[int],
    status_w: int,
    close: tuple[int, ...],
    zygote: int,
    helper: int,
    own_pid_namespace: bool,
) -> NoReturn:
    """The steps of ``_native.c``'s PID 1, where it is not built."""
    code = protocol.EXIT_MANAGER_GONE
    try:
        for fd in close:
            os.close(fd)
        if helper >= 0:
            _wait_for_adoption(helper)
        _linux.die_with_parent()
        if _ended(zygote):  # the zygote died before our prctl
            raise SystemExit("the zygote ended before its task started")
        if os.getpid() != 1:  # no PID namespace (no privilege for one): keep orphans in our tree
            _linux.become_subreaper()
        failure = _worker.enter_cgroups(request.enter_files)  # PID 2 reports it, as in C
        if not request.fork_before_go and failure is None:  # placed once the go frame is readable
            select.select([fds[1]], [], [])
        task = os.fork()
        if task == 0:
            _run_task(request, fds, status_w, failure, own_pid_namespace)
        # Not before the fork: the task must keep Python's SIGINT handler (KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for fd in fds:
            os.close(fd)
        status = _wait_for(task)
        os.write(status_w, wire.EXITED_BODY.pack(status))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _wait_for_adoption(helper: int) -> None:
    # A pidfd polls readable once its process has exited, after the kernel re-parented its
    # children (exit_notify): from then on our parent is the zygote.
    select.select([helper], [], [])
    os.close(helper)


def _ended(pidfd: int) -> bool:
    readable = bool(select.select([pidfd], [], [], 0)[0])
    os.close(pidfd)
    return readable


def _wait_for(task: int) -> int:
    """Reap until the task itself ends (orphans of the namespace come to us too)."""
    while True:
        pid, status = os.wait()
        if pid == task:
            return os.waitstatus_to_exitcode(status)


def _run_task(
    request: Request,
    fds: list[int],
    status_w: int,
    enter_failure: str | None,
    own_pid_namespace: bool,
    oom_score_set: bool = False,
) -> NoReturn:
    """PID 2: prepare (``_prepare_task``), then the worker; exits."""
    code = protocol.EXIT_MANAGER_GONE
    try:
        os.close(status_w)
        result_fd, control_fd, *stdio = fds
        result = transport.Channel(result_fd)
        if enter_failure is not None:  # PID 1 could not enter a cgroup: no task code
            _worker.refuse(enter_failure, result)
        _prepare_task(request, result, stdio, own_pid_namespace, oom_score_set)
        options = request.options
        if own_pid_namespace:  # below our PID 1: its exit ends every descendant, the kernel's way
            # (and psutil, reading the host's /proc with our namespace's pids, would signal
            # the wrong processes).
            options = dataclasses.replace(options, kill_descendants_on_exit=False)
        spec = _worker.WorkerSpec(
            control=transport.Channel(control_fd),
            result=result,
            task=None,
            enter_files=(),  # entered by PID 1: we were born inside
            options=options,
            cpu_time_seconds=request.cpu_time_seconds,
            foreign_fds=(),
            manager_pid=None,  # our parent is PID 1 (dies with the zygote, with the manager)
            die_with_parent=not own_pid_namespace,  # or we are in its namespace: ended with it
            close_inherited_fds=True,
            isolation=_kept_uid(request.isolation) if request.keep_uid else request.isolation,
            slot=request.slot,
            isolation_prepared=True,  # just done; the zygote's environment is allowlisted
        )
        _worker.main(spec)  # exits
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _prepare_task(
    request: Request,
    result: transport.Channel,
    stdio: list[int],
    own_pid_namespace: bool,
    oom_score_set: bool,
) -> None:
    """PID 2, before any of the task's code: its stdio, cwd, OOM score, namespaces, mounts."""
    for fd, target in zip(stdio, request.stdio, strict=True):
        os.dup2(fd, target)  # the manager's stdout/stderr of now
        os.close(fd)
    if request.cwd is not None:
        os.chdir(request.cwd)
    if not oom_score_set:
        # The zygote and PID 1 are the OOM killer's last choice (-1000) in the slot's cgroup:
        # the task must be its first, not inherit that.
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    profile = request.isolation
    if profile is not None:
        _worker.isolate_namespaces(profile, result, own_pid_namespace, request.trees,
                                   request.shm_bytes)  # fmt: skip
        # Placed by now (born in place, entered by PID 1, or attached before the go frame PID 1
        # waited for): the cgroup namespace's root is the task's cgroup.
        _worker.isolate_cgroups(profile, result)
        if profile.new_session:  # no controlling terminal: no TIOCSTI into the operator's
            os.setsid()


def _kept_uid(profile: Any) -> Any:
    """``profile`` with the manager's uid kept (``Request.keep_uid``)."""
    return dataclasses.replace(profile, user=None)
