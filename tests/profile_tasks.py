"""Task functions for tests/test_default_profile.py: honest Glasswall-shaped work, and attacks.

Every attack only probes: it opens for append without writing, creates a uniquely named empty
file and removes it at once, connects and closes. What it reports is "refused: ..." or what it
reached, so a failing test names the hole without leaving anything on the machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import uuid
from typing import Any


def convert(input_file: str, output_file: str) -> str:
    """Glasswall-shaped: read the upload, write the output beside it through a temporary file
    and a rename, configured by an environment variable."""
    with open(input_file) as source:
        data = source.read()
    with open(output_file + ".part", "w") as target:
        target.write(data.upper() + os.environ.get("CONVERTER_SUFFIX", ""))
    os.replace(output_file + ".part", output_file)
    return output_file


def write_relative(name: str, text: str) -> str:
    with open(name, "w") as file:
        file.write(text)
    return os.path.abspath(name)


def environment(name: str) -> str | None:
    return os.environ.get(name)


def ids() -> tuple[int, int]:
    return os.getuid(), os.getgid()


def honest_work() -> dict[str, Any]:
    """What converters do besides their files: a subprocess, threads, a pool inside the task."""
    import multiprocessing

    found: dict[str, Any] = {}
    found["subprocess"] = subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout
    box: list[int] = []
    thread = threading.Thread(target=lambda: box.append(1))
    thread.start()
    thread.join()
    found["thread"] = box
    with multiprocessing.get_context("fork").Pool(2) as pool:
        found["pool"] = pool.map(abs, [-1, -2, -3])
    return found


def _attempt(what: str, action: Any) -> str:
    try:
        result = action()
    except OSError as error:
        return f"refused: {what}: {error.strerror}"
    return f"REACHED {what}: {result}"


def create_and_remove(folder: str) -> str:
    """Create an empty uniquely named file in ``folder`` (persistence) and remove it at once."""
    path = os.path.join(folder, f".sandboxrun-probe-{uuid.uuid4().hex}")

    def action() -> str:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(path)
        return path

    return _attempt(f"create in {folder}", action)


def open_for_append(path: str) -> str:
    """Open ``path`` for appending, write nothing."""

    def action() -> str:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        return path

    return _attempt(f"append to {path}", action)


def read_file(path: str) -> str:
    def action() -> int:
        with open(path, "rb") as file:
            return len(file.read(64))

    return _attempt(f"read {path}", action)


def connect_unix(path: str) -> str:
    def action() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
        return "connected"

    return _attempt(f"connect {path}", action)


def open_device(path: str) -> str:
    def action() -> str:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return "opened"

    return _attempt(f"open {path}", action)


def dev_listing() -> list[str]:
    return sorted(os.listdir("/dev"))


def controlling_terminal() -> str:
    """The task's controlling terminal, as /dev/tty opens it (ENXIO: none)."""
    return open_device("/dev/tty")


def write_and_read_back(path: str, text: str) -> str | None:
    with open(path, "w") as file:
        file.write(text)
    with contextlib.suppress(OSError), open(path) as file:
        return file.read()
    return None


def connect_unix_in_tmp(folder_name: str) -> str:
    """Connect to /tmp/<folder_name>/default, a path built here (nothing in the call names it)."""
    return connect_unix(os.path.join("/tmp", folder_name, "default"))


def open_pty() -> str:
    def action() -> str:
        leader, follower = os.openpty()
        os.close(leader)
        os.close(follower)
        return "opened"

    result = _attempt("openpty", action)
    return "opened" if result.endswith("opened") else result


def _syscall(number: int, *args: int) -> str:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        return f"refused: {os.strerror(ctypes.get_errno())}"
    return f"REACHED: {result}"


def keyrings() -> dict[str, str]:
    """The session keyring (the manager's under a fork), add_key and request_key."""
    import platform

    if platform.machine() != "x86_64":
        return {"skipped": platform.machine()}
    key_spec_session, keyctl_get_keyring_id = -3, 0
    return {
        "keyctl": _syscall(250, keyctl_get_keyring_id, key_spec_session, 0),
        "add_key": _syscall(248, 0, 0, 0, 0, key_spec_session),
        "request_key": _syscall(249, 0, 0, 0, 0),
    }


def new_namespaces() -> dict[str, str]:
    """unshare(CLONE_NEWUSER | CLONE_NEWCGROUP | CLONE_NEWNS) -- the way to a fresh cgroup2
    mount whose root knobs a uid-0 task owned -- and the same through clone()."""
    import platform

    if platform.machine() != "x86_64":
        return {"skipped": platform.machine()}
    flags = 0x10000000 | 0x02000000 | 0x00020000
    return {"unshare": _syscall(272, flags), "ptrace_attach_1": _syscall(101, 16, 1, 0, 0)}


def inject_into_terminal(fd: int) -> str:
    """TIOCSTI: push a command into the input of the terminal behind ``fd``."""
    import fcntl
    import termios

    def action() -> str:
        for char in b"echo pwned\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([char]))
        return "injected"

    return _attempt("TIOCSTI", action)


def threads(count: int) -> int:
    """How many threads of ``count`` start (each sleeps)."""
    import time

    started = 0
    for _ in range(count):
        try:
            threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
        except RuntimeError:
            break
        started += 1
    return started


def visible_processes() -> list[int]:
    """The pids this task's /proc shows (its own namespace's)."""
    return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())


def pid1_mount_table() -> str:
    return read_file("/proc/1/mountinfo")


def fill_dev_shm(megabytes: int) -> str:
    """Write ``megabytes`` into /dev/shm (RAM no cgroup of the psutil backend counts)."""
    path = f"/dev/shm/sandboxrun-fill-{os.getpid()}"

    def action() -> str:
        with open(path, "wb") as file:
            for _ in range(megabytes):
                file.write(b"\0" * (1 << 20))
                file.flush()
        return "written"

    try:
        return _attempt(f"fill /dev/shm with {megabytes} MiB", action)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def read_beside(folder: str, name: str) -> str:
    """Read ``name`` in the folder above ``folder`` (the task names it; its call did not)."""
    return read_file(os.path.join(os.path.dirname(folder), name))


def make_set_id(folder: str) -> dict[str, str]:
    """In a handed folder (the manager's, idmapped: files made there are root's on disk), try to
    leave a set-uid program: chmod, creation with the bit, and a set-gid one. Each probe file is
    removed."""
    import stat as stat_module

    path = os.path.join(folder, f"setid-{uuid.uuid4().hex}")
    found = {}
    try:
        with open(path, "w") as file:
            file.write("#!/bin/sh\n")
        found["chmod u+s"] = _attempt("chmod 4755", lambda: os.chmod(path, 0o4755))
        found["chmod g+s"] = _attempt("chmod 2755", lambda: os.chmod(path, 0o2755))
        created = path + "-created"
        found["open 4755"] = _attempt(
            "create 4755", lambda: os.close(os.open(created, os.O_CREAT | os.O_WRONLY, 0o4755))
        )
        for each in (path, created):
            with contextlib.suppress(OSError):
                if os.stat(each).st_mode & (stat_module.S_ISUID | stat_module.S_ISGID):
                    found[each] = "REACHED: set-id bit on disk"
    finally:
        for each in (path, path + "-created"):
            with contextlib.suppress(OSError):
                os.unlink(each)
    return found
