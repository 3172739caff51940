"""What a task's call hands it, mounted idmapped: the task acts on it as the manager would.

The task runs as an unprivileged host uid (``Isolation.user``, 61000 + slot), which owns no file
of the host. The folders its call names (``_isolation/handed.py``) are mounted into its view
through an **idmapped mount** (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12; tmpfs since 6.3):
the mount's user namespace maps the manager's uid (0) to the task's uid, so on that mount alone
the manager's files are the task's own, and what the task creates there lands owned by the
manager, as a forked worker's output would::

    zygote, once per task uid   user namespace "0 <uid> 1" (a throwaway child unshares it, the
                                zygote writes its maps as root and keeps /proc/<child>/ns/user)
    zygote, per task            each handed path opened without following a symlink (O_PATH,
                                component by component), open_tree(OPEN_TREE_CLONE) of it: a
                                detached copy, idmapped (``detach``); where that fails, the task
                                keeps the manager's uid (``_zygote/server.py``)
    PID 2, per task             each copy attached (move_mount) onto the same path in the task's
                                own mount namespace (``attach``); a folder above it that others
                                cannot traverse (/root, a 0700 parent) is covered by a tmpfs that
                                holds only the way down to what was handed

Why the copy is made in the zygote: it runs in the host's mount namespace, where the source is
visible; the task's view may cover it (``expose_python`` covers a closed /root), and a tree
can be cloned only from one's own mount namespace, but a detached one may be attached anywhere.
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


def detach(path: str, userns_fd: int) -> int:
    """In the zygote: a detached, idmapped copy of the tree at ``path``; its fd. Raises
    ``OSError`` naming the path (a filesystem that cannot be idmapped: EINVAL)."""
    fd = open_path(path)
    try:
        tree = _syscalls.idmapped_tree(fd, userns_fd, True)
        if tree == -errno.EINVAL:  # a submount that cannot be idmapped (procfs...): top only
            tree = _syscalls.idmapped_tree(fd, userns_fd, False)
    finally:
        os.close(fd)
    if tree < 0:
        raise OSError(-tree, f"idmapped mount: {os.strerror(-tree)}", path)
    return tree


def closed_ancestor(path: str, itself: bool = False) -> str | None:
    """The topmost folder above ``path`` (``itself``: or ``path``) that others cannot traverse
    (no o+x: /root, a 0700 mkdtemp parent), or None. In the zygote, the host's view."""
    parts = [p for p in path.split("/") if p][: None if itself else -1]
    for depth in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:depth])
        with contextlib.suppress(OSError):
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return folder
    return None


def attach(
    path: str, tree: int, closed: str | None, opened: set[str], covered: frozenset[str]
) -> None:
    """In PID 2 (root, the task's own mount namespace): the detached ``tree`` mounted at
    ``path``. Under a ``closed`` folder, that folder is covered first (once: ``opened``) by a
    tmpfs holding only the way down, or, already ``covered`` by the view (a closed /root with
    Python bound back), made writable for the way down; ``seal`` makes it read-only again."""
    if closed is not None:
        if closed not in opened:
            if closed in covered:  # the view's cover: ours, read-only
                libc.mount_setattr(closed, 0, libc.MOUNT_ATTR_RDONLY, recursive=False)
            else:
                libc.mount("tmpfs", closed, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=755")
            opened.add(closed)
        os.makedirs(path, mode=0o755, exist_ok=True)
    target = open_path(path)
    try:
        error = _syscalls.attach_tree(tree, target)
    finally:
        os.close(target)
    if error:
        raise OSError(error, f"move_mount: {os.strerror(error)}", path)
    log.debug("handed to the task (idmapped): %s", path)


def seal(opened: set[str]) -> None:
    """The covers ``attach`` opened, read-only again (nothing may be planted in them)."""
    for closed in opened:
        libc.mount_setattr(closed, libc.MOUNT_ATTR_RDONLY, recursive=False)


def probe(path: str, userns_fd: int) -> str | None:
    """None when the filesystem of ``path`` can be idmapped here, else why not."""
    try:
        os.close(detach(path, userns_fd))
    except OSError as error:
        return f"{path}: cannot be idmapped here ({error.strerror})"
    return None
