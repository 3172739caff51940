"""The zygote: a fresh interpreter per worker slot that forks one task at a time on request.

Started by the manager (``client.Zygote``) as ``python -I -c ...`` with the tasks' environment
(``_isolation/environment.py``), no fd but its socket and stdio, in a session of its own (a
terminal's Ctrl-C reaches the manager, which kills the tasks; not the zygotes). It holds nothing
of the manager's: no heap, no open files. Per task::

    LAUNCH  --> import the task's module (once: later tasks find it in sys.modules)
            --> the profile's mount view (once: later tasks copy it, _isolation/_view.py)
            --> unshare(CLONE_NEWPID); fork(); setns(back)    the child is PID 1 of a new namespace
            --> STARTED pid + pidfd                           opened before we can reap: no reuse
            --> waitpid(PID 1)                                PID 1 reports PID 2's status first
            --> EXITED code

Why ``unshare`` + fork + ``setns`` and not a raw ``clone(CLONE_NEWPID)``: the fork is glibc's
``fork()`` with CPython's bookkeeping around it (``os.fork``, or ``PyOS_BeforeFork`` and
``PyOS_AfterFork_*`` in ``_native.c``: at-fork hooks, the GIL, the TID cache), and ``unshare``
may be repeated once ``setns`` has put our children's PID namespace back to our own
(``copy_pid_ns`` refuses only while they differ). It costs two syscalls per task, and no fork
more than a bare fork. The namespace needs a single-threaded caller; a zygote that an imported
module gave a thread forks without one (and says so in STARTED's flags).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # mypy --platform win32/darwin skips the rest

import contextlib
import dataclasses
import gc
import os
import pickle
import socket
from typing import Any

from .. import _linux
from . import reaper, wire


@dataclasses.dataclass(frozen=True)
class Preparation:
    """What the zygote needs of the manager's interpreter to import the tasks' modules."""

    manager_pid: int
    sys_path: tuple[str, ...]
    cwd: str
    main_path: str | None  # the manager's __main__ file, imported as __mp_main__ if a task needs it
    main_name: str | None  # or its module name (python -m ...)
    # cgroup.procs files to move into before READY (the slot the tasks are born in), or ().
    birthplace: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Request:
    """One task's launch (what the reaper and the worker need besides the two fds)."""

    enter_files: tuple[str, ...]
    options: Any  # a _backends.base.WorkerOptions (not imported here: the zygote stays small)
    cpu_time_seconds: float | None
    modules: tuple[str, ...]  # imported before the fork, so each task does not import them again
    needs_main: bool  # the pickled task names __main__: import the manager's main module first
    # False when the manager places PID 1 itself (a parent-side attach): PID 2 may only be
    # forked once that is done, i.e. after the go frame. Otherwise PID 2 is forked at once and
    # waits for the go frame itself, so the fork is not on the task's critical path.
    fork_before_go: bool = True
    # Which of the manager's stdout/stderr (1, 2) follow the two pipes' fds, to become the
    # task's: a zygote outlives the moment it was started, the manager's fds 1 and 2 may not.
    stdio: tuple[int, ...] = ()
    cwd: str | None = None  # the manager's working directory at launch (a zygote outlives it)
    # The task's isolation profile (a sandboxrun._isolation.Isolation; None: none) and worker
    # slot: PID 2 builds the namespaces and mounts, then drops the privileges (its uid: slot).
    isolation: Any = None
    slot: int = 0
    # PID 1 in C where sandboxrun._native is built; False: the Python PID 1 (SANDBOXRUN_NATIVE=0).
    native: bool = True
    # What the task's call hands it (_isolation/handed.py), mounted idmapped by PID 2.
    handed: tuple[str, ...] = ()
    # The size of the task's private /dev/shm where no cgroup charges it to the task, or None.
    shm_bytes: int | None = None
    # Filled here, before the fork: each handed path with its detached idmapped copy (an fd
    # PID 2 inherits and attaches) and the folder above it others cannot traverse, or whether
    # the task keeps the manager's uid because a handed path cannot be idmapped.
    trees: tuple[tuple[str, int, str | None], ...] = ()
    keep_uid: bool = False


class Server:
    def __init__(self, sock: socket.socket, preparation: Preparation) -> None:
        self.sock = sock
        self.preparation = preparation
        self.main_ready = False
        self.pid_namespace_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.status_r, self.status_w = os.pipe()
        os.set_blocking(self.status_r, False)
        self.user_namespace = False  # see main() and fork_through_helper()
        self.own_pidfd = os.pidfd_open(os.getpid())  # each PID 1 checks it once armed

    def serve(self) -> None:
        while True:
            kind, body, fds = wire.receive(self.sock, wire.MAX_MESSAGE)
            if not kind:  # the manager closed its end: it is done with us
                return
            if kind == wire.PRELOAD:  # imports of tasks about to come, side by side with others
                for fd in fds:
                    os.close(fd)
                modules, needs_main = pickle.loads(body)
                self.import_modules(Request((), None, None, tuple(modules), bool(needs_main)))
                wire.send(self.sock, wire.READY, wire.FLAGS.pack(0))
                continue
            try:
                request: Request | None = pickle.loads(body) if kind == wire.LAUNCH else None
                if request is None or len(fds) != 2 + len(request.stdio):
                    wire.send(self.sock, wire.FAILED, f"unexpected message {kind!r}".encode())
                    continue
                pid, flags = self.fork(request, fds)
            except Exception as error:
                wire.send(self.sock, wire.FAILED, f"{type(error).__name__}: {error}".encode())
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            self.watch(pid, flags, request.native)

    def fork(self, request: Request, fds: list[int]) -> tuple[int, int]:
        self.import_modules(request)
        flags = 0
        if request.isolation is not None:  # before NEWPID: its builder must not be a PID 1
            from .._isolation import prepare_view

            prepare_view(request.isolation)
            request = _plan_handing(request)
            flags |= wire.FLAG_UID_KEPT if request.keep_uid else 0
        try:
            pid, pid_flags = self._fork_pid1(request, fds)
        finally:  # PID 2 has its copies (or no task runs): ours go, whatever happened
            for _, tree, _ in request.trees:
                os.close(tree)
        return pid, pid_flags | flags

    def _fork_pid1(self, request: Request, fds: list[int]) -> tuple[int, int]:
        own_namespace = _after_imports().single_threaded
        if self.user_namespace:  # its helper is a fork: single-threaded whatever we are
            return self.fork_through_helper(request, fds), wire.FLAG_PID_NAMESPACE
        if request.isolation is not None and not own_namespace:
            # unshare(CLONE_NEWPID) needs a single-threaded caller; an isolated task without
            # its PID namespace would see and signal the host's processes: refused, not weaker.
            raise OSError(
                "a module imported for the task started a thread in the zygote, so the task"
                " cannot get a PID namespace of its own: isolation refuses to run it (import"
                " that module inside the task function, or use isolation='none')"
            )
        if own_namespace:
            try:
                _linux.unshare(_linux.CLONE_NEWPID)
            except OSError as error:  # no CAP_SYS_ADMIN, a seccomp filter: fork without one
                if request.isolation is not None:
                    raise OSError(f"no PID namespace for the isolated task: {error}") from error
                own_namespace = False
        close = (self.sock.fileno(), self.status_r, self.pid_namespace_fd)
        try:
            pid = reaper.fork(request, fds, self.status_w, close, self.own_pidfd,
                              native=request.native, own_pid_namespace=own_namespace)  # fmt: skip
        finally:
            if own_namespace:
                # Must not fail: every later fork would go into the namespace of this task.
                _linux.setns(self.pid_namespace_fd, _linux.CLONE_NEWPID)
        return pid, wire.FLAG_PID_NAMESPACE if own_namespace else 0

    def fork_through_helper(self, request: Request, fds: list[int]) -> int:
        """In our own user namespace (non-root): ``setns`` back into the host's PID namespace
        needs CAP_SYS_ADMIN over it, which we lack, so the namespace is made by a short-lived
        child instead: it unshares, forks PID 1, says its pid and exits; PID 1 is re-parented
        to us (a child subreaper), so we hold and reap it as if we had forked it. One fork more
        per task, for non-root managers only. PID 1 sets its death signal only once that
        re-parenting is done (the kernel sends it at every parent's exit, the helper's too)."""
        read_fd, write_fd = os.pipe()
        helper = os.fork()
        if helper == 0:
            code = 1
            try:
                os.close(read_fd)
                _linux.unshare(_linux.CLONE_NEWPID)
                ours = os.pidfd_open(os.getpid())
                close = (self.sock.fileno(), self.status_r, self.pid_namespace_fd, write_fd)
                pid = reaper.fork(request, fds, self.status_w, close, self.own_pidfd, ours,
                                  native=request.native)  # fmt: skip
                os.write(write_fd, wire.EXITED_BODY.pack(pid))
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        try:
            _, status = os.waitpid(helper, 0)  # PID 1 is ours once the helper is gone
            data = os.read(read_fd, wire.EXITED_BODY.size)
        finally:
            os.close(read_fd)
        if status != 0 or len(data) != wire.EXITED_BODY.size:
            raise OSError(f"the helper making the task's PID namespace failed ({status:#x})")
        (pid,) = wire.EXITED_BODY.unpack(data)
        return int(pid)

    def watch(self, pid: int, flags: int, native: bool = False) -> None:
        """STARTED, reap PID 1, EXITED with the task's code. In C where built (``native``):
        until PID 1 is reaped, every page written here is a copy-on-write fault."""
        if native and reaper.native_watch is not None:
            reaper.native_watch(self.sock.fileno(), pid, flags, self.status_r)
            return
        pidfd = os.pidfd_open(pid)  # before waitpid: the pid cannot be reused yet
        try:
            wire.send(self.sock, wire.STARTED, wire.STARTED_BODY.pack(pid, flags), (pidfd,))
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = self.reported_status()
        if code is None:  # PID 1 itself was killed (timeout, OOM, the manager's abort)
            code = os.waitstatus_to_exitcode(status)
        wire.send(self.sock, wire.EXITED, wire.EXITED_BODY.pack(code))

    def reported_status(self) -> int | None:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.status_r, 64):
                data += chunk
        if len(data) != wire.EXITED_BODY.size:  # nothing, or not one record: not PID 2's status
            return None
        (code,) = wire.EXITED_BODY.unpack(data)
        return int(code)

    def import_modules(self, request: Request) -> None:
        if request.needs_main and not self.main_ready:
            self.main_ready = True
            _import_main(self.preparation)
        for name in request.modules:
            if name not in sys.modules:
                # The task's own unpickling reports a failure, inside its limits.
                with contextlib.suppress(Exception):
                    __import__(name)


@dataclasses.dataclass
class _Imports:
    """What is redone only when the set of imported modules changed (checked before each fork):
    the imports are the only code of its own the zygote runs between tasks."""

    modules: int = -1
    single_threaded: bool = False


_imports = _Imports()


def _after_imports() -> _Imports:
    """Once per new import set: the heap it built moved into the collector's permanent
    generation (gc.freeze), so that a collection in a task does not walk -- write to -- every
    object we hold, a copy-on-write fault per page (why gc.freeze exists: bpo-31558); and our
    thread count read (the kernel's: C threads too), since an import may start a thread and
    unshare(CLONE_NEWPID) needs a single-threaded caller. Per task these cost a collection and a
    buffered open()."""
    if len(sys.modules) != _imports.modules:
        _imports.modules = len(sys.modules)
        gc.collect()
        gc.freeze()
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        _imports.single_threaded = fields[17] == b"1"  # num_threads (field 20; [0] is field 3)
    return _imports


def _plan_handing(request: Request) -> Request:
    """The handed paths as detached idmapped copies PID 2 attaches (``_isolation/_idmap.py``),
    through the idmap of the task's uid (a user namespace, made once per uid and kept). Where
    one cannot be idmapped (tmpfs before Linux 6.3, NFS and others), this task keeps the
    manager's uid -- honest code still reaches what it was handed -- and STARTED says so
    (``FLAG_UID_KEPT``: ``TaskResult.isolation`` names the weaker profile)."""
    profile = request.isolation
    ids = None if profile is None else profile.uid_gid(request.slot)
    if not request.handed or ids is None or os.geteuid() != 0:
        return request
    from .._isolation import _idmap

    trees: list[tuple[str, int, str | None]] = []
    try:
        namespace = _idmap.user_namespace(*ids)
        for path in request.handed:
            trees.append((path, _idmap.detach(path, namespace), _idmap.closed_ancestor(path)))
    except OSError as error:
        for _, tree, _ in trees:
            os.close(tree)
        from .. import _log

        _log.get("sandboxrun.isolation").warning(
            "the task keeps the manager's uid: %s cannot be idmapped here (%s)",
            error.filename, error.strerror)  # fmt: skip
        return dataclasses.replace(request, handed=(), keep_uid=True)
    return dataclasses.replace(request, trees=tuple(trees))


def _import_main(preparation: Preparation) -> None:
    # What multiprocessing's spawn does with the parent's __main__: import it as __mp_main__ and
    # alias it, so functions pickled as __main__.name resolve.
    from multiprocessing import spawn

    with contextlib.suppress(Exception):
        if preparation.main_name is not None:
            spawn._fixup_main_from_name(preparation.main_name)  # type: ignore[attr-defined]
        elif preparation.main_path is not None:
            spawn._fixup_main_from_path(preparation.main_path)  # type: ignore[attr-defined]


def _prepare(preparation: Preparation) -> None:
    sys.path[:] = list(preparation.sys_path)
    with contextlib.suppress(OSError):
        os.chdir(preparation.cwd)
    # Preload what every task's bootstrap runs, so no task pays for these imports.
    from .. import _worker  # noqa: F401


def _move_into(birthplace: tuple[str, ...]) -> None:
    """Live in the slot's cgroups (the tasks are born there), out of the OOM killer's choice."""
    for path in birthplace:
        with open(path, "w") as procs:
            procs.write("0")
    if birthplace:
        # -1000 needs CAP_SYS_RESOURCE; without it the tasks' 1000 still makes them the choice.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("-1000")


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    kind, body, fds = wire.receive(sock, wire.MAX_MESSAGE)
    for extra in fds:
        os.close(extra)
    if kind != wire.HELLO:
        sys.exit(f"sandboxrun zygote: expected HELLO, got {kind!r}")
    preparation: Preparation = pickle.loads(body)
    _linux.die_with_parent()
    if os.getppid() != preparation.manager_pid:  # the manager died before prctl
        return
    _prepare(preparation)
    _move_into(preparation.birthplace)
    server = Server(sock, preparation)
    if os.geteuid() != 0:
        # A non-root manager's tasks run as its own uid: without a PID namespace each could
        # signal or ptrace the manager. Our own user namespace (ids unchanged) lets us make one
        # per task; where the kernel forbids it, tasks run without and the manager warns.
        with contextlib.suppress(OSError):
            _linux.own_user_namespace()
            _linux.become_subreaper()
            server.user_namespace = True
    wire.send(sock, wire.READY, wire.FLAGS.pack(0))
    server.serve()
