"""PID 1 of a task's namespace: enter the sandbox, wait for the go frame, fork the task, reap.

Why a reaper and not the task as PID 1 (pid_namespaces(7)): the kernel drops every signal PID 1
has no handler for, also the ones it sends itself, so a task that is PID 1 survives its own
``os.kill(os.getpid(), SIGKILL)``, ``os.abort()`` ends as SIGSEGV, and a default SIGTERM does
nothing -- the fault matrix would change meaning. bubblewrap keeps a reaper as PID 1 for the same
reason. Here the task is PID 2, with ordinary signal semantics; we wait for it, reaping the
namespace's orphans on the way, and hand its status to the zygote before we exit. Our exit
SIGKILLs whatever is left in the namespace: no setsid, double fork or subreaper trick outlives it.

Order (each step before the next for a reason):
  1. close the zygote's fds        the task must not talk to the zygote or read other statuses
  2. PR_SET_PDEATHSIG              a dead zygote takes the namespace with it
  3. enter the cgroups             before anything of the task's exists (PID 2 is born inside)
     namespaces and mounts         (_isolation) while we are root and alone
  4. fork PID 2 -> _worker.main    the task, which waits for the go frame (the pickled task)
                                   -- or, when the manager places PID 1 itself (a parent-side
                                   attach), PID 1 reads the go frame first and forks after it
                                   -- with its own cgroup namespace, rooted where we are placed
  5. wait; write PID 2's status; _exit
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # mypy --platform win32/darwin skips the rest

import dataclasses
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, NoReturn

from .. import _linux, _worker
from .. import _protocol as protocol
from . import wire

if TYPE_CHECKING:
    from .server import Request


def run(request: Request, fds: list[int], status_w: int, close: tuple[int, ...]) -> NoReturn:
    code = protocol.EXIT_MANAGER_GONE
    try:
        for fd in close:
            os.close(fd)
        result_fd, control_fd, *stdio = fds
        for fd, target in zip(stdio, request.stdio, strict=True):
            os.dup2(fd, target)  # the manager's stdout/stderr of now
            os.close(fd)
        if request.cwd is not None:
            os.chdir(request.cwd)
        # The zygote shares the task's cgroup and is the OOM killer's last choice (-1000):
        # the task must be its first, not inherit that.
        with open("/proc/self/oom_score_adj", "w") as adjust:
            adjust.write("1000")
        _linux.die_with_parent()
        if os.getpid() != 1:  # no PID namespace (no privilege for one): keep orphans in our tree
            _linux.become_subreaper()
        result, control = Connection(result_fd), Connection(control_fd)
        _worker.enter_sandbox(request.enter_files, result)
        if request.isolation is not None:  # PID 1 of the new pid namespace: its /proc is ours
            _worker.isolate_namespaces(request.isolation, result)
        payload = b""
        if not request.fork_before_go:
            payload = _worker.read_go_frame(control)
        if request.isolation is not None:  # placed by now: the namespace's root is the task's
            _worker.isolate_cgroups(request.isolation, result)
        task = os.fork()
        if task == 0:
            _run_task(request, result, None if payload else control, payload, status_w)
        # Not before the fork: the task must keep Python's SIGINT handler (KeyboardInterrupt).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        result.close()
        if not control.closed:
            control.close()
        del payload
        status = _wait_for(task)
        os.write(status_w, wire.EXITED_BODY.pack(status))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _run_task(
    request: Request,
    result: Connection,
    control: Connection | None,
    payload: bytes,
    status_w: int,
) -> NoReturn:
    code = protocol.EXIT_MANAGER_GONE
    try:
        os.close(status_w)
        options = request.options
        if os.getpid() == 2:  # below our PID 1: its exit ends every descendant, the kernel's way
            # (and psutil, reading the host's /proc with our namespace's pids, would signal
            # the wrong processes).
            options = dataclasses.replace(options, kill_descendants_on_exit=False)
        spec = _worker.WorkerSpec(
            control=control,
            result=result,
            task=None,
            payload=payload,
            enter_files=(),  # entered by the reaper: we were born inside
            options=options,
            cpu_time_seconds=request.cpu_time_seconds,
            foreign_fds=(),
            manager_pid=None,  # our parent is the reaper (dies with the zygote, with the manager)
            close_inherited_fds=True,
            isolation=request.isolation,
            slot=request.slot,
            isolation_prepared=True,  # by PID 1; the zygote's environment is allowlisted
        )
        del payload
        _worker.main(spec)  # exits
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _wait_for(task: int) -> int:
    """Reap until the task itself ends (orphans of the namespace come to us too)."""
    while True:
        pid, status = os.wait()
        if pid == task:
            return os.waitstatus_to_exitcode(status)
