"""What a task's call hands it, mounted idmapped: the task acts on it as the manager would.

The task runs as an unprivileged host uid (``Isolation.user``, 61000 + slot), which owns no file
of the host. The folders its call names (``_isolation.handed``) are bound into its view through
an **idmapped mount** (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12; tmpfs since 6.3): the
mount's user namespace maps the manager's uid (0) to the task's uid, so on that mount alone the
manager's files are the task's own, and what the task creates there lands owned by the manager,
as a forked worker's output would::

    zygote, once per task uid     user namespace "0 <uid> 1" (a throwaway child unshares it, the
                                  zygote writes its maps as root and keeps /proc/<child>/ns/user)
    zygote, once per filesystem   can it be idmapped? (a throwaway child tries, see ``probe``)
    PID 2, per task               open each handed path without following a symlink (O_PATH),
                                  open_tree(OPEN_TREE_CLONE) + mount_setattr(IDMAP) +
                                  move_mount onto the same fd: no path is looked up twice

A user namespace used only as an idmap is a table: no process lives in it, it grants nothing.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import errno
import os
import stat

from .. import _log, _syscalls
from . import _libc as libc

log = _log.get("sandboxrun.isolation")

#: {(uid, gid): fd of a user namespace mapping 0 to them}, held by the zygote for its tasks.
_namespaces: dict[tuple[int, int], int] = {}
#: {st_dev: None (idmaps) or why not}, the zygote's probe per filesystem.
_probed: dict[int, str | None] = {}


def user_namespace(uid: int, gid: int) -> int:
    """The fd of a user namespace whose uid and gid 0 are ``uid``/``gid`` on the host."""
    key = (uid, gid)
    if key in _namespaces:
        return _namespaces[key]
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - ends in os._exit
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            libc.unshare(libc.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)  # until the zygote holds the namespace
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.ECHILD, "the child making the idmap's user namespace failed")
        # Written by us, root in the parent namespace: any single host id may be mapped, and
        # setgroups stays as it is (only an unprivileged writer must deny it first).
        for name, value in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{pid}/{name}", "w") as file:
                file.write(f"0 {value} 1\n")
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)
    _namespaces[key] = fd
    return fd


def open_path(path: str) -> int:
    """An O_PATH fd of ``path`` (absolute), walked one component at a time without following a
    symlink anywhere: a component swapped for a symlink after the manager checked the path
    fails here (ELOOP or ENOTDIR) instead of redirecting the mount."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            if part == "..":
                raise OSError(errno.EINVAL, "'..' in a handed path", path)
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH|O_NOFOLLOW opens the link itself
                raise OSError(errno.ELOOP, "a symlink in a handed path", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def bind(path: str, userns_fd: int) -> None:
    """``path`` idmapped onto itself in this mount namespace (we are root, in the task's own
    mount namespace). Raises ``OSError`` naming the path."""
    fd = open_path(path)
    try:
        error = _syscalls.bind_idmapped(fd, fd, userns_fd, True)
        if error == errno.EINVAL:  # a submount that cannot be idmapped (procfs, ...): top only
            error = _syscalls.bind_idmapped(fd, fd, userns_fd, False)
        if error:
            raise OSError(error, f"idmapped mount: {os.strerror(error)}", path)
    finally:
        os.close(fd)
    log.debug("handed to the task (idmapped): %s", path)


def probe(path: str, userns_fd: int) -> str | None:
    """None when the filesystem of ``path`` can be idmapped here, else why not. Tried once per
    filesystem in a throwaway child (its own mount namespace: nothing stays mounted)."""
    try:
        device = os.stat(path).st_dev
    except OSError as error:
        return str(error)
    if device in _probed:
        return _probed[device]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - ends in os._exit
        code = 0
        try:
            os.close(read_fd)
            libc.unshare(libc.CLONE_NEWNS)
            libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
            fd = open_path(path)
            code = _syscalls.bind_idmapped(fd, fd, userns_fd, False)
        except OSError as error:
            code = error.errno or errno.EIO
        finally:
            with contextlib.suppress(OSError):
                os.write(write_fd, code.to_bytes(4, "little"))
            os._exit(0)
    os.close(write_fd)
    try:
        data = os.read(read_fd, 4)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    code = int.from_bytes(data, "little") if len(data) == 4 else errno.EIO
    why = None if code == 0 else f"{path}: cannot be idmapped here ({os.strerror(code)})"
    _probed[device] = why
    return why
