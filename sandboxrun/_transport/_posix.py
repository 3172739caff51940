"""The POSIX transport: raw non-blocking pipes, pidfds, one selector (the fast path).

Raw fds rather than ``multiprocessing.connection``: a hostile worker can write any bytes or
stop mid-frame, and a non-blocking read never lets it stall the event loop.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import sys
from collections.abc import Callable
from typing import Any

assert sys.platform != "win32"  # the portable transport serves Windows

NAME = "posix"
DEFAULT_START_METHOD: str | None = None
_PIPE_SIZE = 1 << 20


def _pidfd_works() -> bool:
    if sys.platform != "linux":
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel before 5.3
        return False
    return True


HAVE_PIDFD = _pidfd_works()
BARE_FORK = HAVE_PIDFD  # the bare fork launcher has no sentinel: its exit fd is a pidfd
# The worker's end is watched through a pidfd, not through multiprocessing's sentinel pipe (whose
# write end the worker holds until it exits): only then may the worker close every fd it got.
EXIT_BY_PIDFD = sys.platform == "linux" and HAVE_PIDFD

Selector: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector
read = os.read
write = os.write
close = os.close


def readinto(fd: int, view: memoryview) -> int:
    return os.readv(fd, [view])


def _set_pipe_size(fd: int) -> None:
    # A bigger pipe means fewer wake-ups per large result (Linux only).
    if sys.platform == "linux":
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)


class Channel:
    """The worker's end of a pipe, read and written raw (``write_all``, ``read_exactly``): what
    the worker needs of ``multiprocessing.connection.Connection``, without importing it. That
    module imports threading, tempfile, subprocess and random: in the zygote they were more heap
    to copy at each fork, and their at-fork hooks (threading's reinit, random's reseed)
    ran in every task the zygote forked -- their Python code writes pages shared with the
    zygote, one copy-on-write fault each (measured in a zygote's image: from the fork to the
    child's first line 489 -> 130 us of CPU, 254 -> 65 page faults).
    Under spawn and forkserver it is pickled as Connection is: the fd duplicated for the child."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError("handle is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction  # the manager's side: imported there anyway

        return _rebuild_channel, (reduction.DupFd(self.fileno()),)


def _rebuild_channel(duplicate: Any) -> Channel:
    return Channel(duplicate.detach())


def result_pipe(max_bytes: int | None = None) -> tuple[int, Channel]:
    # max_bytes is the ResultReader's to enforce here: it reads the frame prefix before it
    # allocates, straight from the pipe.
    read_fd, write_fd = os.pipe()
    _set_pipe_size(write_fd)
    os.set_blocking(read_fd, False)
    return read_fd, Channel(write_fd)


def control_pipe() -> tuple[Channel, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    return Channel(read_fd), write_fd


def exit_handle(process: Any) -> int:
    # A pidfd turns readable when the process ends, whoever holds its pipes; the
    # multiprocessing sentinel (a pipe) would wait for grandchildren that inherited it.
    if sys.platform == "linux" and HAVE_PIDFD and process.pid is not None:
        with contextlib.suppress(OSError):
            return os.pidfd_open(process.pid)
    return os.dup(int(process.sentinel))  # no pidfd (macOS): multiprocessing's sentinel pipe


def write_all(connection: Channel, data: bytes | memoryview) -> None:
    """Blocking write of every byte (the worker side; the manager never blocks)."""
    fd = connection.fileno()
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exactly(connection: Channel, size: int) -> bytes | None:
    fd = connection.fileno()
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, min(size - len(chunks), 1 << 20))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)
