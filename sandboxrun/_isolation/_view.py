"""The task's view of the filesystem, built once per zygote and profile, entered per task.

Most of a profile's mounts do not depend on the task: the read-only pass (``ProtectSystem=``),
``/sys``, the Python installation bound back for another uid, ``ReadWritePaths=`` outside
``/tmp``, the hidden socket directories. Built per task they were ~2 ms of PID 1's ~3.4
(docs/security.md, "What it costs"). So the zygote builds them once, in a mount namespace of a
throwaway child, and holds that namespace by an fd; per task PID 1 enters it and copies it::

    zygote, before each fork      held(profile): the view's fd, built if missing or stale
      throwaway child               unshare(NEWNS); "/" MS_REC|MS_PRIVATE; shared steps; wait
      zygote                        open /proc/<child>/ns/mnt; let the child exit
    PID 1 (per task)              setns(view); close every view fd; unshare(NEWNS | ...):
                                  a private copy, then what is per task (a fresh /proc for its
                                  pid namespace, its own /tmp /var/tmp /dev/shm, mqueue)

The view is never used itself: each task gets a copy (``unshare`` after ``setns``), so nothing
a task mounts or writes to a tmpfs reaches the view or the next task; the view's mounts are
private, so nothing propagates to or from the host either. The host's mount table may change
after the view was built (a volume mounted later): the zygote polls its own
``/proc/self/mountinfo`` (``POLLPRI`` on every mount-table change, proc(5)) before each task
and builds the views again when it changed, so a task sees the host's mounts of its start, as
it would with a per-task copy. Where a view cannot be built or entered (no CAP_SYS_ADMIN: a
non-root manager's user namespace, a seccomp filter) the task builds its whole view itself.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import os
import select
import traceback
from collections.abc import Callable

from .. import _log
from . import _libc as libc
from .profile import Isolation

log = _log.get("sandboxrun.isolation")

MAX_VIEWS = 8  # profiles held at once by one zygote (each an fd and a few dozen mounts)


class Views:
    """The zygote's prepared views, one per profile (the pool key does not include the
    profile: one zygote serves managers with different profiles)."""

    def __init__(self, build: Callable[[Isolation], None]) -> None:
        self._build = build  # the task-independent steps, run in the throwaway child
        self.fds: dict[Isolation, int] = {}
        self._seen: dict[Isolation, object] = {}
        self.mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self.mountinfo, select.POLLPRI)
        self._changed()  # the first poll reports the table as changed: consume it

    def held(self, profile: Isolation, seen: object) -> int | None:
        """The fd of ``profile``'s view (built now if missing, or if what the steps looked at
        on the host, ``seen``, changed), or None: build it per task."""
        if self._changed():
            log.debug("the host's mount table changed: the views are built again")
            self.close()
        if profile in self.fds and self._seen.get(profile) != seen:
            log.debug("a path the view of %r looked at changed: built again", profile.name)
            os.close(self.fds.pop(profile))
        if profile not in self.fds:
            if os.geteuid() != 0:  # a user namespace per task: a view of ours is not enterable
                return None
            if len(self.fds) >= MAX_VIEWS:
                os.close(self.fds.pop(next(iter(self.fds))))
            fd = self._make(profile)
            if fd is None:
                return None
            self.fds[profile], self._seen[profile] = fd, seen
        return self.fds[profile]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _changed(self) -> bool:
        return bool(self._poll.poll(0))

    def _make(self, profile: Isolation) -> int | None:
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends in os._exit
            code = 1
            try:
                os.close(ready_r)
                os.close(release_w)
                libc.unshare(libc.CLONE_NEWNS)
                libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
                self._build(profile)
                os.write(ready_w, b"1")
                os.read(release_r, 1)  # held open until the zygote has the namespace's fd
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(release_r)
        fd, why = None, "its builder failed (its stderr says why)"
        try:
            if os.read(ready_r, 1) == b"1":
                fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            why = str(error)
        finally:
            os.close(ready_r)
            os.close(release_w)
            os.waitpid(pid, 0)
        if fd is None:
            log.warning("no mount view of %r (%s): each task builds its own", profile.name, why)
        return fd


_views: Views | None = None


def prepare(profile: Isolation, build: Callable[[Isolation], None], seen: object) -> None:
    """In the zygote, before forking a task with ``profile``: have its view ready."""
    global _views
    try:
        if _views is None:
            _views = Views(build)
        _views.held(profile, seen)
    except OSError as error:  # a task then builds its own view: slower, as strict
        log.warning("no prepared mount view (%s): each task builds its own", error)


def enter(profile: Isolation, flags: int) -> bool:
    """In PID 1: enter a private copy of ``profile``'s view (True), or False: none prepared,
    nothing changed. Raises ``OSError`` once inside the view (the task must not run there).

    Every view fd is closed here, the one entered too: the task forked next holds none."""
    if _views is None or os.geteuid() != 0:
        return False
    fd = _views.fds.get(profile)
    fds = [*_views.fds.values(), _views.mountinfo]
    _views.fds.clear()
    try:
        if fd is None:
            return False
        try:
            cwd = os.getcwd()  # setns puts us at the namespace's root
            libc.setns(fd, libc.CLONE_NEWNS)
        except OSError as error:
            log.warning("the prepared mount view cannot be entered (%s): built here", error)
            return False
        libc.unshare(flags)  # the copy: what we mount from here stays ours
        try:
            os.chdir(cwd)
        except OSError as error:
            log.warning("the task starts in / (%s is not in its view: %s)", cwd, error)
            os.chdir("/")
        return True
    finally:
        for each in fds:
            with contextlib.suppress(OSError):
                os.close(each)
