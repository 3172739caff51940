"""The manager's side: zygote processes, a pool of idle ones, and one task's process handle.

::

    Launcher --ZygoteChild.start()--> Pool.acquire(key) -> Zygote (idle, else a new one)
                                      Zygote.launch(request, result fd, control fd)
                                        LAUNCH --> <-- STARTED pid + pidfd   (checked)
    scheduler: exit fd (a dup of the pidfd) readable
             --ZygoteChild.join()-->  <-- EXITED code  --> Pool.release(zygote)

The pool is process-wide: a server that makes a ProcessManager per batch (the Glasswall way)
pays the interpreter start once per slot, not once per batch. Keyed by what a zygote was made
from (interpreter, sys.path, environment): managers with different ``env=`` never share one.
A zygote that broke its protocol, timed out or died is killed and never reused; its task gets
the exit code the kernel gave PID 1 through the pidfd, or ``None`` (reported as a dead worker).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # mypy --platform win32/darwin skips the rest

import atexit
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping

from .._backends.cgroupfs import read_bytes  # raw os.read: cheaper than a buffered open()
from . import wire
from .server import Preparation, Request

log = logging.getLogger("sandboxrun.zygote")

# Seconds to wait for a zygote's answer. Generous: an emulated guest starts Python 30x slower.
START_TIMEOUT = 120.0
REPLY_TIMEOUT = 60.0

_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from sandboxrun._zygote.server import main; main(int(sys.argv[1]))"
)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Key = tuple[str, tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]


class ZygoteError(RuntimeError):
    """A zygote could not be started or broke its protocol."""


def _preparation(birthplace: tuple[str, ...]) -> Preparation:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    path = getattr(main, "__file__", None)
    if name is not None and name.endswith(".__main__"):
        name = name[: -len(".__main__")] + ".__main__"
    return Preparation(
        manager_pid=os.getpid(),
        sys_path=tuple(p for p in sys.path if isinstance(p, str)),
        cwd=os.getcwd(),
        main_path=None if name is not None else (os.path.abspath(path) if path else None),
        main_name=name,
        birthplace=birthplace,
    )


class Zygote:
    """One zygote process and our end of its socket."""

    def __init__(self, key: Key, environment: Mapping[str, str], wait: bool = True) -> None:
        """Start it; unless ``wait`` is False, wait until it is ready (else: ``wait_ready``)."""
        self.key = key
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(theirs.fileno()), _PACKAGE_PARENT],
                pass_fds=(theirs.fileno(),),
                env=dict(environment),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C goes to the manager, which kills the tasks
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.broken = False
        self.imported: set[str] = set()  # modules it was asked to import (PRELOAD)
        self.main_imported = False
        log.debug("zygote pid %s started", self.process.pid)
        try:
            wire.send(self.sock, wire.HELLO, pickle.dumps(_preparation(key[3])))
        except BaseException:
            self.kill()
            raise
        if wait:
            self.wait_ready()

    def preload(self, modules: set[str] | frozenset[str], needs_main: bool) -> bool:
        """Ask it to import what it lacks; True when an answer (READY) is to be awaited."""
        missing = modules - self.imported
        main = needs_main and not self.main_imported
        if not missing and not main:
            return False
        try:
            wire.send(self.sock, wire.PRELOAD, pickle.dumps((sorted(missing), main)))
        except OSError as error:
            self.broken = True
            raise ZygoteError(f"zygote pid {self.pid}: cannot send PRELOAD ({error})") from error
        self.imported |= missing
        self.main_imported |= main
        return True

    def wait_ready(self) -> None:
        try:
            kind, _, fds = self.reply(START_TIMEOUT)
            for fd in fds:
                os.close(fd)
            if kind != wire.READY:
                raise ZygoteError(f"zygote pid {self.process.pid} did not start (got {kind!r})")
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return not self.broken and self.process.poll() is None

    def reply(self, timeout: float | None) -> tuple[bytes, bytes, list[int]]:
        self.sock.settimeout(timeout)
        try:
            kind, body, fds = wire.receive(self.sock, wire.MAX_REPLY)
        except (OSError, ValueError) as error:  # timeout, reset, closed
            self.broken = True
            if isinstance(error, TimeoutError):
                raise ZygoteError(f"zygote pid {self.pid}: no answer ({error})") from error
            raise ZygoteError(f"zygote pid {self.pid} {self._ended()} ({error})") from error
        if not kind:
            self.broken = True
            raise ZygoteError(f"zygote pid {self.pid} {self._ended()}")
        return kind, body, fds

    def _ended(self) -> str:
        """How it ended, for an error: its socket closed or broke as it died, or soon will."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        code = self.process.returncode
        if code is None:
            return "broke its socket (still running)"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"ended (killed by {signal.Signals(-code).name})"
        return f"ended (exit code {code})"

    def launch(self, request: Request, fds: tuple[int, ...]) -> tuple[int, int, int]:
        """Start one task (``fds``: result, control, then ``request.stdio``): its PID 1's
        ``(pid, pidfd, flags)``."""
        try:
            wire.send(self.sock, wire.LAUNCH, pickle.dumps(request), fds)
        except OSError as error:
            self.broken = True
            raise ZygoteError(f"zygote pid {self.pid}: cannot send the task ({error})") from error
        kind, body, received = self.reply(REPLY_TIMEOUT)
        if kind == wire.STARTED and len(body) == wire.STARTED_BODY.size and len(received) == 1:
            pid, flags = wire.STARTED_BODY.unpack(body)
            if _is_our_child(received[0], pid, self.pid):
                return pid, received[0], flags
        for fd in received:
            os.close(fd)
        self.broken = True
        if kind == wire.FAILED:
            raise ZygoteError(f"zygote pid {self.pid} could not start the task: "
                              f"{body.decode(errors='replace')[:500]}")  # fmt: skip
        raise ZygoteError(f"zygote pid {self.pid} answered a launch with {kind!r}: not trusted")

    def exit_code(self, timeout: float | None) -> int | None:
        """The task's exit code, once its PID 1 has ended; None if the zygote cannot say."""
        try:
            kind, body, fds = self.reply(timeout)
        except ZygoteError as error:
            log.warning("%s; the task is reported as a dead worker", error)
            return None
        for fd in fds:
            os.close(fd)
        if kind == wire.EXITED and len(body) == wire.EXITED_BODY.size:
            (code,) = wire.EXITED_BODY.unpack(body)
            if -64 <= code <= 255:
                return int(code)
        self.broken = True
        log.warning("zygote pid %s sent %r for an exit code: not trusted", self.pid, kind + body)
        return None

    def close(self) -> None:
        """Ask it to end (end of file on its socket), then make sure."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        log.debug("zygote pid %s killed", self.pid)


def _is_our_child(pidfd: int, pid: int, zygote: int) -> bool:
    """The zygote's word checked: the pidfd is of ``pid``, a child of the zygote's -- or of a
    process that already ended and was reaped (its pidfd then signals nothing)."""
    owner = _pidfd_pid(pidfd)
    if owner == -1:
        return True
    if owner != pid:
        return False
    parent = _parent_of(pid)
    return parent == zygote or (parent is None and _pidfd_pid(pidfd) == -1)


def _pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd refers to (-1 once reaped), from ``/proc/self/fdinfo``; None: no pidfd."""
    try:
        for line in read_bytes(f"/proc/self/fdinfo/{fd}").splitlines():
            if line.startswith(b"Pid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _parent_of(pid: int) -> int | None:
    try:
        return int(read_bytes(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # already reaped: the zygote did not wait for its STARTED to be read


class Pool:
    """Idle zygotes of this process, shared by every manager in it."""

    MAX_IDLE_PER_KEY = 32
    MAX_KEYS = 4  # the least recently used key's idle zygotes end past this many

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Key, list[Zygote]] = {}
        os.register_at_fork(after_in_child=self._forget)
        atexit.register(self.close)

    @staticmethod
    def _key(environment: Mapping[str, str], birthplace: tuple[str, ...]) -> Key:
        return (sys.executable, tuple(sys.path), tuple(sorted(environment.items())), birthplace)

    def warm(
        self,
        environment: Mapping[str, str],
        birthplaces: list[tuple[str, ...]],
        modules: set[str] | frozenset[str] = frozenset(),
        needs_main: bool = False,
    ) -> None:
        """Have an idle zygote ready for each of ``birthplaces`` (one per slot about to launch),
        starting the missing ones side by side: the event loop waits for the slowest start once,
        not for each in turn while the first tasks run (their clocks would be late)."""
        wanted: dict[Key, int] = {}
        for birthplace in birthplaces:
            key = self._key(environment, birthplace)
            wanted[key] = wanted.get(key, 0) + 1
        starting = []
        with self._lock:
            for key, count in wanted.items():
                idle = self._idle.setdefault(key, [])
                for dead in [z for z in idle if not z.alive()]:
                    idle.remove(dead)
                    dead.kill()
                missing = count - len(idle)
                starting += [key] * max(0, missing)
        # One that cannot start is left out (logged): its slot's launch starts another and,
        # failing again, fails that task alone; the others' zygotes are kept.
        zygotes = []
        try:
            for key in starting:
                try:
                    zygotes.append(Zygote(key, environment, wait=False))
                except Exception as error:  # OSError from fork/exec, ZygoteError
                    log.warning("a zygote could not be started: %s: %s", type(error).__name__,
                                error)  # fmt: skip
            for zygote in zygotes:
                try:
                    zygote.wait_ready()  # kills it when it fails
                except ZygoteError as error:
                    log.warning("%s", error)
        except BaseException:
            for zygote in zygotes:
                zygote.kill()
            raise
        for zygote in zygotes:
            self.release(zygote)  # a dead one is dropped
        self._preload(wanted, modules, needs_main)

    def _preload(
        self, wanted: dict[Key, int], modules: set[str] | frozenset[str], needs_main: bool
    ) -> None:
        """The idle zygotes about to be used import the tasks' modules now, all at once (a
        test module can take seconds to import under emulation: one at a time, at each launch,
        the event loop -- and the running tasks' clocks -- would wait for each)."""
        if not modules and not needs_main:
            return
        taken: list[Zygote] = []
        with self._lock:
            for key, count in wanted.items():
                idle = self._idle.get(key, [])
                taken += idle[-count:]
                del idle[-count:]
        try:
            waiting = []
            for zygote in taken:
                try:
                    if zygote.preload(modules, needs_main):
                        waiting.append(zygote)
                except ZygoteError as error:  # broken: release() drops it
                    log.warning("%s", error)
            for zygote in waiting:
                try:
                    zygote.wait_ready()
                except ZygoteError as error:
                    log.warning("%s", error)
        finally:
            for zygote in taken:
                self.release(zygote)

    def acquire(self, environment: Mapping[str, str], birthplace: tuple[str, ...] = ()) -> Zygote:
        key = self._key(environment, birthplace)
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                zygote = idle.pop()
                if zygote.alive():
                    return zygote
                zygote.kill()
        return Zygote(key, environment)

    def release(self, zygote: Zygote) -> None:
        if not zygote.alive():
            zygote.kill()
            return
        ended: list[Zygote] = []
        with self._lock:
            idle = self._idle.pop(zygote.key, [])
            self._idle[zygote.key] = idle  # the most recently used key last
            # A zygote's key holds the tasks' environment: a server whose environment or env=
            # changes from one manager to the next (a job id in it) would otherwise keep every
            # earlier key's zygotes for good.
            while len(self._idle) > self.MAX_KEYS:
                ended += self._idle.pop(next(iter(self._idle)))
            if len(idle) < self.MAX_IDLE_PER_KEY:
                idle.append(zygote)
            else:
                ended.append(zygote)
        for each in ended:
            each.close()

    def close(self) -> None:
        self.discard(lambda _: True)

    def discard(self, which: Callable[[tuple[str, ...]], bool]) -> None:
        """End the idle zygotes whose birthplace ``which`` selects (a backend closing its slots)."""
        with self._lock:
            zygotes = []
            for key in [key for key in self._idle if which(key[3])]:
                zygotes.extend(self._idle.pop(key))
        for zygote in zygotes:
            zygote.close()

    def _forget(self) -> None:
        # A forked child (a worker under start_method="fork", a user's fork) must not talk to
        # or wait for our zygotes: they are not its children. Its copies of the sockets close.
        self._lock = threading.Lock()
        for idle in self._idle.values():
            for zygote in idle:
                with contextlib.suppress(OSError):
                    zygote.sock.close()
        self._idle.clear()


POOL = Pool()


class ZygoteChild:
    """One task started by a zygote, with the slice of ``multiprocessing.Process`` the
    scheduler uses. ``pid`` is the host pid of the task's PID 1 (its reaper)."""

    def __init__(
        self,
        environment: Mapping[str, str],
        request: Request,
        result_fd: int,
        control_fd: int,
        birthplace: tuple[str, ...] = (),
    ) -> None:
        self._environment = environment
        self._birthplace = birthplace
        self._request = request
        self._fds = (result_fd, control_fd)
        self._zygote: Zygote | None = None
        self.pid: int | None = None
        self.pidfd = -1
        self.exitcode: int | None = None
        self.own_pid_namespace = False
        self.kept_uid = False  # a handed path could not be idmapped: the manager's uid kept
        self._joined = False

    def start(self) -> None:
        stdio = _open_stdio()
        native = os.environ.get("SANDBOXRUN_NATIVE") != "0"  # read per launch: tests flip it
        request = dataclasses.replace(self._request, stdio=stdio, cwd=_cwd(), native=native)
        zygote = POOL.acquire(self._environment, self._birthplace)
        try:
            self.pid, self.pidfd, flags = zygote.launch(request, self._fds + stdio)
        except BaseException:
            zygote.kill()
            raise
        self._zygote = zygote
        self.own_pid_namespace = bool(flags & wire.FLAG_PID_NAMESPACE)
        self.kept_uid = bool(flags & wire.FLAG_UID_KEPT)
        if not self.own_pid_namespace:
            _warn_no_namespace(zygote.pid)

    def join(self, timeout: float | None = None) -> None:
        if self._joined or self._zygote is None:
            return
        if timeout is not None and not _wait_readable(self.pidfd, timeout):
            return  # still running
        self._joined = True
        zygote, self._zygote = self._zygote, None
        self.exitcode = zygote.exit_code(REPLY_TIMEOUT)
        if self.exitcode is None:
            zygote.kill()
        else:
            POOL.release(zygote)

    def kill(self) -> None:
        if self.pidfd >= 0 and self.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self._zygote is not None:  # never joined: we cannot tell its state, do not reuse it
            self._zygote.kill()
            self._zygote = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under us: the task starts where the zygote is
        return None


def _open_stdio() -> tuple[int, ...]:
    """Our fds 1 and 2 where they are open (a daemon may have closed them)."""
    found = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.fstat(fd)
            found.append(fd)
    return tuple(found)


def _wait_readable(fd: int, timeout: float) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


_warned = False


def _warn_no_namespace(pid: int) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("zygote pid %s forks tasks without a PID namespace of their own (no"
                    " CAP_SYS_ADMIN, or a thread in the zygote): a task's tree is killed through"
                    " its cgroup or process tree only", pid)  # fmt: skip


