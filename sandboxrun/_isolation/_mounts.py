"""Namespaces and the task's view of the filesystem: run once in PID 1, before PID 2 exists.

Order (bubblewrap/systemd, research/isolation.md §2 and §11.2)::

    [not root: user namespace, uid/gid maps]           -> enter_user_namespace
    unshare(NEWNS | NEWIPC [| NEWNET])                 -> namespaces
    "/" MS_REC|MS_PRIVATE                              nothing propagates back to the host
    read-only pass (mount_setattr AT_RECURSIVE,        ProtectSystem= full: /usr /etc /boot +
      per-mount remount before 5.12)                     Python + sandboxrun; strict: "/"
    /sys, /sys/fs/cgroup read-only                     ProtectKernelTunables, ProtectControlGroups
    fresh /proc (we are PID 1 of the new pid ns)       the task sees only its own namespace
    /proc/sys, /proc/sysrq-trigger... read-only
    tmpfs /tmp /var/tmp /dev/shm, mqueue               PrivateTmp (charged to the task's cgroup)
    read_write_paths bound back (writable)             ReadWritePaths= (and seen through /tmp)
    socket dirs covered by an empty read-only tmpfs    connect() ignores read-only mounts
    lo up                                              PrivateNetwork

New mounts are made after the read-only pass, so they stay writable. Every step raises
``IsolationError`` with what failed; the caller reports it and runs no task code.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import contextlib
import fcntl
import functools
import os
import site
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from .. import _linux, _log
from . import _idmap, _seccomp, _view
from . import _libc as libc
from .profile import Isolation

log = _log.get("sandboxrun.isolation")

_SYSTEM_FULL = ("/usr", "/etc", "/boot", "/efi")
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi", "latency_stats")
_TMPFS_FLAGS = libc.MS_NOSUID | libc.MS_NODEV
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


class IsolationError(OSError):
    """A step of the isolation setup failed: the task must not run."""


def enter_user_namespace() -> None:
    """Non-root: a user namespace mapping our uid/gid to 0 in it, so the other namespaces and
    the mounts are allowed (a single-id map: the task keeps our kernel uid, see security.md)."""
    uid, gid = os.geteuid(), os.getegid()
    libc.unshare(libc.CLONE_NEWUSER)
    Path("/proc/self/setgroups").write_text("deny")  # before gid_map (CVE-2014-8989)
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")


@functools.cache  # fixed for the interpreter's life; computed in the zygote, not per task
def _python_paths() -> tuple[str, ...]:
    """The interpreter and the code it loads at start: a writable one is code in the next run
    (``.pth`` lines starting with ``import`` run at every interpreter start)."""
    package = Path(__file__).resolve().parents[1]
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, str(package)]
    paths += site.getsitepackages()
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        paths.append(user_site)
    return tuple(paths)


def _outermost(paths: list[str]) -> list[str]:
    """Existing real directories, without those inside another one of the list."""
    real = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    kept: list[str] = []
    for path in real:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _mountinfo() -> list[tuple[str, set[str]]]:
    """(mount point, per-mount options) of every mount, in table order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 for a space
        found.append((point, set(fields[5].split(","))))
    return found


def _remount_read_only_each(top: str) -> None:
    """Before 5.12: one MS_REMOUNT|MS_BIND per mount at and below ``top``, restating the flags
    it has (in a user namespace they are locked: omitting one is EPERM). Fatal on ``top`` only;
    a submount that refuses (autofs, FUSE) is logged, as systemd does."""
    names = {"nosuid": libc.MS_NOSUID, "nodev": libc.MS_NODEV, "noexec": libc.MS_NOEXEC}
    prefix = top.rstrip("/") + "/"
    for point, options in _mountinfo():
        if point != top and not point.startswith(prefix):
            continue
        kept = sum(flag for name, flag in names.items() if name in options)
        flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | kept
        try:
            libc.mount(None, point, None, flags)
        except OSError as error:
            if point == top:
                raise
            log.warning("%s stays writable for the task: %s", point, error)


def make_read_only(path: str, bind_first: bool | None = True) -> None:
    """``path`` and every mount below it read-only in this mount namespace. ``bind_first``
    None: bind it onto itself only if it is no mount point yet."""
    if bind_first is None:
        # Already one (/sys): no bind, whose copies of every submount each task would copy
        # and tear down again (EINVAL: not the root of a mount).
        try:
            libc.mount_setattr(path, libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID)
            log.debug("read-only for the task: %s", path)
            return
        except OSError as error:
            if error.errno not in (38, 22):
                raise
        bind_first = True
    if bind_first:  # mount_setattr needs a mount point; a recursive bind keeps what is below
        libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
    try:
        libc.mount_setattr(path, libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID)
    except OSError as error:
        if error.errno not in (38, 22):  # ENOSYS (before 5.12), EINVAL: per-mount fallback
            raise
        _remount_read_only_each(path)
    log.debug("read-only for the task: %s", path)


def _make_writable(path: str) -> None:
    libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
    try:
        libc.mount_setattr(path, 0, libc.MOUNT_ATTR_RDONLY)
    except OSError as error:
        if error.errno not in (38, 22):
            raise
        libc.mount(None, path, None, libc.MS_REMOUNT | libc.MS_BIND)
    log.debug("writable for the task: %s", path)


def _read_only_pass(profile: Isolation) -> None:
    if profile.protect_system == "strict":
        make_read_only("/", bind_first=False)  # "/" is a mount point already
    elif profile.protect_system == "full":
        for path in _outermost([*_SYSTEM_FULL, *_python_paths()]):
            make_read_only(path, bind_first=None)
    if profile.protect_kernel_tunables and os.path.isdir("/sys"):
        make_read_only("/sys", bind_first=None)
    elif profile.protect_control_groups and os.path.isdir("/sys/fs/cgroup"):
        make_read_only("/sys/fs/cgroup", bind_first=None)


@functools.cache  # the installation's place: fixed for the interpreter's life
def python_covers() -> frozenset[str]:
    """The closed folders ``expose_python`` covers in the view (a pyenv's /root)."""
    paths = _outermost(list(_python_paths()))
    found = (_idmap.closed_ancestor(path, itself=True) for path in paths)
    return frozenset(closed for closed in found if closed is not None)


def expose_python() -> None:
    """A task under another uid must still import Python's own modules: when the installation
    sits under a closed directory (pyenv in /root, mode 0700), that directory is covered with
    an empty read-only tmpfs (ProtectHome=tmpfs) and only the installation is bound back."""
    held: dict[str, dict[str, int]] = {}  # closed ancestor -> {path: O_PATH fd}
    for path in _outermost(list(_python_paths())):
        closed = _idmap.closed_ancestor(path, itself=True)
        if closed is not None:
            held.setdefault(closed, {})[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        for closed, paths in held.items():
            _tmpfs(closed, "mode=755")
            for path, fd in paths.items():
                os.makedirs(path)
                libc.mount(f"/proc/self/fd/{fd}", path, None, libc.MS_BIND | libc.MS_REC)
            libc.mount_setattr(closed, libc.MOUNT_ATTR_RDONLY, recursive=False)
            log.debug("%s covered, %s bound back: the task's uid reads Python", closed, paths)
    finally:
        for paths in held.values():
            for fd in paths.values():
                os.close(fd)


def _proc(profile: Isolation, own_pid_namespace: bool) -> None:
    # A procfs shows the pid namespace of whoever mounts it: only a process of the task's own
    # namespace (the zygote's PID 2) gets one without the manager in it. Elsewhere (the fork
    # fallback) the host's /proc stays, and only the uid drop keeps the manager's entries out
    # of reach.
    # hidepid=2: a task under another uid sees only its own processes -- not its PID 1, which
    # stays in the zygote's mount namespace (its /proc/1/mountinfo would show the host's mount
    # table, its /proc/1/environ the zygote's environment).
    if own_pid_namespace:
        flags = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
        libc.mount("proc", "/proc", "proc", flags, "hidepid=2" if profile.user else "")
    if profile.protect_kernel_tunables:
        for path in _proc_read_only():
            make_read_only(path)


@functools.cache  # procfs's entries are the kernel's: the same in every task's fresh /proc
def _proc_read_only() -> tuple[str, ...]:
    return tuple(f"/proc/{name}" for name in _PROC_READ_ONLY if os.path.exists(f"/proc/{name}"))


def _tmpfs(path: str, options: str, flags: int = 0) -> None:
    libc.mount("tmpfs", path, "tmpfs", _TMPFS_FLAGS | flags, options)
    log.debug("tmpfs on %s (%s)", path, options)


#: What a private /dev holds of the host's (bubblewrap's --dev): harmless character devices.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (
    ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"),
)  # fmt: skip


def _private_dev() -> None:
    """A tmpfs on /dev with only ``_DEVICES`` bound from the host's, the ``_DEV_LINKS`` and
    empty mount points for pts, shm and mqueue, then read-only: nothing of the host's devtmpfs
    (loop devices, KVM, vcs, disks, consoles, other sessions' ptys) is reachable, and nothing
    can be planted. Not MS_NODEV: the bound devices must open. A view step: per task only the
    mounts inside it are new (``_dev_per_task``)."""
    held = {}
    for name in _DEVICES:
        with contextlib.suppress(OSError):
            held[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
    try:
        libc.mount("tmpfs", "/dev", "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "mode=755,size=64k")
        for name, fd in held.items():
            os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            libc.mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, libc.MS_BIND)
        for name in ("pts", "shm", "mqueue"):
            os.mkdir(f"/dev/{name}", 0o755)
        for name, target in _DEV_LINKS:
            os.symlink(target, f"/dev/{name}")
        libc.mount_setattr("/dev", libc.MOUNT_ATTR_RDONLY, recursive=False)
    finally:
        for fd in held.values():
            os.close(fd)
    log.debug("private /dev: %s", ", ".join(held))


def _dev_per_task(profile: Isolation, shm_bytes: int | None) -> None:
    """A new devpts instance (the task's ptys only), its own /dev/shm -- sized to the memory
    limit where no cgroup charges tmpfs pages to the task (``shm_bytes``) -- and mqueue."""
    flags = libc.MS_NOSUID | libc.MS_NOEXEC
    libc.mount("devpts", "/dev/pts", "devpts", flags, "newinstance,ptmxmode=0666,mode=620")
    size = f",size={shm_bytes}" if shm_bytes else ""
    _tmpfs("/dev/shm", f"mode=1777{size}")
    if profile.private_ipc:
        libc.mount("mqueue", "/dev/mqueue", "mqueue", _TMPFS_FLAGS | libc.MS_NOEXEC)


_PRIVATE = ("/tmp/", "/var/tmp/")


def _kept_readable(profile: Isolation) -> list[str]:
    """What the task runs that lives under /tmp (a checkout, a venv, a command's script there):
    it must stay visible through the private /tmp, read-only (a task must not plant code in
    what the next run executes). Paths given writable are not repeated here."""
    wanted = [*_python_paths(), *(p for p in sys.path if p), *profile.read_only_paths]
    real = {os.path.realpath(p) for p in wanted if p.startswith("/")}
    under = [p for p in real if p.startswith(_PRIVATE) and os.path.exists(p)]
    dirs = _outermost([p for p in under if os.path.isdir(p)])
    files = [p for p in under if os.path.isfile(p)
             and not any(p.startswith(d.rstrip("/") + "/") for d in dirs)]  # fmt: skip
    return dirs + files


def _kept_readable_cached(profile: Isolation) -> list[str]:
    """``_kept_readable``, as the zygote computed it before the fork (its realpath and stat
    calls were ~0.7 ms of PID 1's time), or computed now."""
    found = _KEPT.get(profile)
    return found[1] if found is not None else _kept_readable(profile)


#: {profile: (view_inputs, _kept_readable)}, filled in the zygote by prepare_view.
_KEPT: dict[Isolation, tuple[object, list[str]]] = {}


def _cwd_below_tmp(covered: list[str]) -> list[str]:
    """A working directory below /tmp, not in ``covered``: kept visible, read-only, as what the
    task runs is (the cwd /tmp itself becomes the private one)."""
    with contextlib.suppress(FileNotFoundError):
        cwd = os.getcwd()
        inside = any(cwd == c or cwd.startswith(c.rstrip("/") + "/") for c in covered)
        if cwd.startswith(_PRIVATE) and not inside:
            return [cwd]
    return []


def _bind_back(path: str, fd: int) -> None:
    """Bind what ``fd`` (O_PATH, opened before the tmpfs) is back at ``path``."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    libc.mount(f"/proc/self/fd/{fd}", path, None, libc.MS_BIND | libc.MS_REC)


def _private_tmp(profile: Isolation) -> None:
    # Paths under /tmp would vanish under the tmpfs: hold them open first, bind them back
    # after (a bind source may be /proc/self/fd/N); the readable ones are then made read-only.
    writable = [p for p in profile.read_write_paths if p.startswith(_PRIVATE)]
    held = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in writable if os.path.isdir(p)}
    kept = _kept_readable_cached(profile)
    cwd = _cwd_below_tmp([*kept, *held])
    if cwd:  # a cwd above kept paths (a checkout under /tmp run from its top) covers them
        kept = [p for p in kept if not p.startswith(cwd[0].rstrip("/") + "/")]
    readable = {p: os.open(p, os.O_PATH) for p in [*kept, *cwd] if p not in held}
    shared = ("/tmp", "/var/tmp") if profile.private_dev else ("/tmp", "/var/tmp", "/dev/shm")
    try:
        for path in shared:
            if os.path.isdir(path) and not os.path.islink(path):
                _tmpfs(path, "mode=1777")
        # Read-only ones first, writable ones last: a writable path inside a read-only one
        # (an output folder in a checkout under /tmp) must stay writable, and a later bind
        # must not cover an earlier one.
        for path, fd in readable.items():
            _bind_back(path, fd)
        for path in readable:
            make_read_only(path, bind_first=False)
        for path, fd in held.items():
            _bind_back(path, fd)
        _hide_sockets_bound_back(profile, [*readable, *held])
        _resolve_cwd_again()  # else the task writes into the host's /tmp by relative paths
    finally:
        for fd in (*held.values(), *readable.values()):
            os.close(fd)
    if profile.private_ipc and not profile.private_dev and os.path.isdir("/dev/mqueue"):
        libc.mount("mqueue", "/dev/mqueue", "mqueue", _TMPFS_FLAGS | libc.MS_NOEXEC)


def _hide_sockets(profile: Isolation) -> None:
    done: set[str] = set()
    for path in profile.hide_sockets:
        real = os.path.realpath(path)
        if real in done or not os.path.isdir(real):
            continue
        if profile.private_tmp and real.startswith("/tmp/"):
            continue  # already gone with the host's /tmp
        _tmpfs(real, "mode=755,size=4k", libc.MS_RDONLY | libc.MS_NOEXEC)
        done.add(real)


def _hide_sockets_bound_back(profile: Isolation, bound: list[str]) -> None:
    """Socket folders under /tmp were gone with the host's /tmp, but not those inside what the
    private /tmp binds back (a checkout there): covered here, after every bind."""
    for path in profile.hide_sockets:
        if not _under_private(path):
            continue
        real = os.path.realpath(path)  # in the task's view: what it would connect() through
        inside = any(real == b or real.startswith(b.rstrip("/") + "/") for b in bound)
        if inside and os.path.isdir(real):
            _tmpfs(real, "mode=755,size=4k", libc.MS_RDONLY | libc.MS_NOEXEC)


def loopback_up() -> None:
    """``lo`` up in a fresh network namespace (SIOCSIFFLAGS, as isolate and nsjail do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        (flags,) = struct.unpack_from("h", fcntl.ioctl(sock, _SIOCGIFFLAGS, request), 16)
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _step(what: str, function: Callable[..., object], *args: object) -> None:
    try:
        function(*args)
    except OSError as error:
        raise IsolationError(error.errno, f"isolation step {what!r} failed: {error}") from error


def _under_private(path: str) -> bool:
    return path in ("/tmp", "/var/tmp") or path.startswith(_PRIVATE)


def view_steps(profile: Isolation) -> None:
    """What does not depend on the task: in the zygote's prepared view (``_view``), or per task
    where there is none. Raises ``IsolationError``."""
    _step("read-only", _read_only_pass, profile)
    if profile.user is not None and os.geteuid() == 0:
        _step("expose Python to the task's uid", expose_python)
    if profile.protect_system == "strict":  # binds copy the read-only flag: clear it
        for path in _outermost(list(profile.read_write_paths)):
            if not _under_private(path):  # those are bound back with the private /tmp
                _step(f"read_write_paths {path}", _make_writable, path)
    _step("hide sockets", _hide_sockets, profile)
    if profile.private_dev:
        _step("private /dev", _private_dev)


@functools.lru_cache(maxsize=16)
def _inputs_of(profile: Isolation) -> tuple[str, ...]:
    paths = [*_SYSTEM_FULL, "/sys", "/sys/fs/cgroup", *profile.hide_sockets,
             *profile.read_write_paths, *profile.read_only_paths, *_python_paths(),
             *(p for p in sys.path if p.startswith("/"))]  # fmt: skip
    return tuple(dict.fromkeys(paths))


def view_inputs(profile: Isolation) -> tuple[tuple[int, int, int] | None, ...]:
    """What the prepared steps decided by looking at the host's tree (is a path there, a
    directory, where does a symlink lead, is it the same one: one stat each, ~0.1 ms in
    all): when it changed, the view and the kept-readable paths are made again, as a
    per-task build would see them."""
    found: list[tuple[int, int, int] | None] = []
    for path in _inputs_of(profile):
        try:
            stat = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((stat.st_dev, stat.st_ino, stat.st_mode))
    return tuple(found)


def prepare_view(profile: Isolation) -> None:
    """In the zygote, before it forks a task with ``profile``: its view built (or still
    good) for ``setup_namespaces_and_mounts`` in PID 2 to enter, and what PID 2 would
    compute. Never raises for the view: without one the task builds its own."""
    if not profile.enabled:
        return
    inputs = view_inputs(profile)
    _view.prepare(profile, view_steps, inputs)
    _proc_read_only()  # read here once, not in every task
    libc.cap_last_cap()
    if profile.seccomp:
        _seccomp.program()  # assembled here once; every task loads the same bytes
    python_covers()  # here once, not in every task
    if profile.private_tmp and _KEPT.get(profile, (None,))[0] != inputs:
        _KEPT[profile] = (inputs, _kept_readable(profile))


def _resolve_cwd_again() -> None:
    """The cwd by its path through the new mounts, else a task started in /usr/... writes by
    relative paths to the mount below the read-only bind (the private /tmp comes after)."""
    with contextlib.suppress(FileNotFoundError):  # a removed cwd: nothing to resolve
        os.chdir(os.getcwd())


def _flags(profile: Isolation) -> int:
    flags = libc.CLONE_NEWNS
    flags |= libc.CLONE_NEWIPC if profile.private_ipc else 0
    flags |= libc.CLONE_NEWNET if profile.private_network else 0
    return flags


def setup_namespaces_and_mounts(
    profile: Isolation,
    own_pid_namespace: bool | None = None,
    trees: tuple[tuple[str, int, str | None], ...] = (),
    shm_bytes: int | None = None,
) -> None:
    """Give this process (and what it forks next) the profile's namespaces and view.

    Call in the task's pid namespace (``own_pid_namespace``; None: we are its PID 1), single-
    threaded, as root (or not root: a user namespace is entered first), already inside the
    task's cgroups. ``trees``: each handed path, its idmapped copy made by the zygote and the
    folder above it others cannot traverse (``_idmap``); ``shm_bytes``: the size of the
    private /dev/shm, or None.
    Raises ``IsolationError``.
    In a zygote's child, a private copy of the view the zygote prepared (``prepare_view``) is
    entered and only what is per task is built here.
    """
    if not profile.enabled:
        return
    entered = False
    try:
        entered = _view.enter(profile, _flags(profile))
    except OSError as error:  # half-way: in the view itself, or no namespace at all
        what = f"isolation step 'enter the view' failed: {error}"
        raise IsolationError(error.errno, what) from error
    if not entered:
        if not _linux.has_cap_sys_admin():  # not root, nor in a user namespace we made (zygote)
            _step("user namespace", enter_user_namespace)
        _step("unshare", libc.unshare, _flags(profile))
        _step("private propagation", libc.mount, None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
        view_steps(profile)
        _step("working directory", _resolve_cwd_again)
    if own_pid_namespace is None:
        own_pid_namespace = os.getpid() == 1
    _step("/proc", _proc, profile, own_pid_namespace)
    if profile.private_dev:
        _step("/dev/pts, /dev/shm", _dev_per_task, profile, shm_bytes)
    if profile.private_tmp:
        _step("private /tmp", _private_tmp, profile)
    if trees:  # last: over the private /tmp and the view's covers
        opened: set[str] = set()
        # what view_steps' expose_python covered, in the view or here
        exposed = profile.user is not None and os.geteuid() == 0
        covered = python_covers() if exposed else frozenset()
        for path, tree, closed in trees:
            _step(f"hand {path} to the task", _idmap.attach, path, tree, closed, opened, covered)
        _step("seal the way down to the handed paths", _idmap.seal, opened)
        _step("working directory", _resolve_cwd_again)  # a cwd inside a handed folder
    if profile.protect_system == "strict":
        for path in _outermost(list(profile.read_write_paths)):
            if _under_private(path):
                _step(f"read_write_paths {path}", _make_writable, path)
    if profile.private_network:
        _step("loopback", loopback_up)
