"""Which measures work here: each step tried once in a throwaway child (systemd's
``can_mount_proc()`` idea: the whole sequence, not a guess from sysctls).

    manager --fork--> probe child: unshare(NEWPID) --fork--> PID 1: each step in order,
                                                              a JSON line back on a pipe

Nothing of it touches the host: the mounts are made in the child's private mount namespace.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import json
import os
import time
from collections.abc import Callable

from . import _cgroupns, _idmap, _mounts, _privileges, _seccomp
from . import _libc as libc
from .profile import DEFAULT, DEFAULT_UID_BASE, STRICT

_PROBE_SECONDS = 10.0
_cache: dict[str, bool | str] | None = None


def fork_call(function: Callable[..., object], *args: object) -> int:
    """Fork a child that runs ``function(*args)`` and ``_exit``s, whatever happens; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            function(*args)
        finally:
            os._exit(0)
    return pid


def _private_tmp() -> None:
    """The task's own private /tmp, as ``_mounts`` builds it: a fresh tmpfs with what the task
    runs that lives under /tmp (a checkout, a venv: the manager's sys.path) bound back
    read-only. The later steps then see what a task will."""
    _mounts._private_tmp(STRICT)


def _python_readable() -> None:
    """A task under another uid imports from the interpreter's tree and from sandboxrun, in its
    view: both must be readable to it there (a Python under /root, mode 0700, is not; a
    checkout under /tmp is only through what the private /tmp binds back)."""
    import encodings

    for module in (encodings, sys.modules[__name__.partition("._")[0]]):
        path = str(module.__file__)
        os.listdir(os.path.dirname(os.path.dirname(path)))
        with open(path, "rb") as file:
            file.read(1)


def _private_dev() -> None:
    _mounts._private_dev()
    _mounts._dev_per_task(DEFAULT, None)


def _idmapped_mounts() -> None:
    """What the default profile hands a task is mounted idmapped: tried on /tmp, where
    Glasswall-shaped code keeps its uploads (tmpfs: Linux 6.3; ext4, xfs, btrfs: 5.12)."""
    why = _idmap.probe("/tmp", _idmap.user_namespace(DEFAULT_UID_BASE, DEFAULT_UID_BASE))
    if why is not None:
        raise OSError(f"{why}: such tasks keep the manager's uid")


def _seccomp_filter() -> None:
    """Loaded last, as in a task; then a call it must refuse is refused."""
    _seccomp.load(_seccomp.program())
    try:
        libc.unshare(libc.CLONE_NEWUSER)
    except OSError:
        return
    raise OSError("the filter is loaded but unshare(CLONE_NEWUSER) still works")


def _steps(root: bool) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("mount_namespace", lambda: libc.unshare(libc.CLONE_NEWNS | libc.CLONE_NEWIPC)),
        ("private_propagation",
         lambda: libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)),
        ("private_tmp", _private_tmp),
        ("mount_setattr", lambda: libc.mount_setattr("/tmp", libc.MOUNT_ATTR_RDONLY)),
        ("read_only_system", lambda: _mounts.make_read_only("/usr")),
        ("fresh_proc", lambda: libc.mount("proc", "/proc", "proc", libc.MS_NOSUID)),
        ("protect_kernel_tunables", lambda: _mounts.make_read_only("/proc/sys")),
        ("private_dev", _private_dev),
        ("idmapped_mounts", _idmapped_mounts if root else (lambda: None)),
        ("cgroup_namespace", _cgroupns.enter_cgroup_namespace),
        ("network_namespace", lambda: libc.unshare(libc.CLONE_NEWNET)),
        ("loopback", _mounts.loopback_up),
        ("drop_capabilities", _privileges.drop_bounding_set if root else libc.capset_empty),
        ("expose_python", _mounts.expose_python if root else (lambda: None)),
        ("unprivileged_uid",
         (lambda: os.setresuid(DEFAULT_UID_BASE, DEFAULT_UID_BASE, DEFAULT_UID_BASE))
         if root else (lambda: None)),
        ("slot_uid_reads_python", _python_readable),
        ("no_new_privileges", lambda: libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)),
        ("seccomp", _seccomp_filter),
    ]  # fmt: skip


def _pid1(write_fd: int, found: dict[str, bool | str]) -> None:
    found["pid_namespace"] = os.getpid() == 1
    for name, step in _steps(found["user_namespace"] == "not needed (root)"):
        try:
            step()
            found[name] = True
        except OSError as error:
            found[name] = f"{type(error).__name__}: {error}"
    os.write(write_fd, json.dumps(found).encode() + b"\n")


def _child(write_fd: int, read_fd: int) -> None:
    os.close(read_fd)
    found: dict[str, bool | str] = {"user_namespace": "not needed (root)"}
    root = os.geteuid() == 0
    try:
        if not root:
            _mounts.enter_user_namespace()  # a pid namespace needs caps: the userns first
            found["user_namespace"] = True
        libc.unshare(libc.CLONE_NEWPID)
    except OSError as error:
        text = f"{type(error).__name__}: {error}"
        failed = "pid_namespace" if root or found["user_namespace"] is True else "user_namespace"
        found[failed] = text
        os.write(write_fd, json.dumps(found).encode() + b"\n")
        return
    os.waitpid(fork_call(_pid1, write_fd, found), 0)


def _run() -> dict[str, bool | str]:
    read_fd, write_fd = os.pipe()
    pid = fork_call(_child, write_fd, read_fd)
    os.close(write_fd)
    deadline = time.monotonic() + _PROBE_SECONDS
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    with os.fdopen(read_fd, "rb") as reader:
        line = reader.readline()
    try:
        found: dict[str, bool | str] = json.loads(line)
    except ValueError:
        found = {"pid_namespace": "the probe child ended without an answer"}
    return found


def probe(refresh: bool = False) -> dict[str, bool | str]:
    """{measure: True, or why it failed here}; run once per process, then cached."""
    global _cache
    if _cache is None or refresh:
        _cache = _run()
    return dict(_cache)
