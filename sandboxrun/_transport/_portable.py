"""The portable transport: ``multiprocessing.connection`` pipes, sentinels and ``wait``.

What Windows offers (and macOS or Linux too, which is how CI runs this code on Linux with
``SANDBOXRUN_TRANSPORT=portable``)::

    worker --send_bytes(<= 1 MiB messages)--> result Connection --reader thread--> chunks
    loop:  multiprocessing.connection.wait(process sentinels, timeout = nearest deadline)
    end:   the tree is killed (the sandbox's collect), the reader thread reaches EOF, the
           ResultReader takes the chunks

A Connection read blocks until a whole message is there, and a hostile worker may stop in the
middle of one: so the loop never reads a result itself. One daemon thread per job drains the
result pipe (the worker never blocks on a full pipe) and the loop waits on the exit sentinels
only; the kill of the tree ends the last writer, and so the thread. Handles are keys of a table:
the scheduler keeps handing ints around as with fds.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import selectors
import threading
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .._header import MAX_HEADER_BYTES

Channel = Connection  # the worker's end of a pipe (the posix transport has its own, raw)

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

NAME = "portable"
DEFAULT_START_METHOD: str | None = "spawn"
BARE_FORK = False
EXIT_BY_PIDFD = False  # the exit is the sentinel pipe: the worker must keep its write end

_MESSAGE = 1 << 20
_FRAME_OVERHEAD = 16 + MAX_HEADER_BYTES  # the length prefix and the longest header
_DRAIN_GRACE = 5.0  # after the tree is dead, how long a reader may take to see EOF
log = logging.getLogger("sandboxrun.transport")


class _Result:
    """The parent end of one result pipe, drained by a thread."""

    def __init__(self, connection: Connection, max_bytes: int | None) -> None:
        self.connection = connection
        # What the thread may buffer: the longest frame the ResultReader could accept. A
        # hostile worker that sends more is cut off here, not in the manager's memory.
        self.budget = None if max_bytes is None else max_bytes + _FRAME_OVERHEAD
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.thread = threading.Thread(target=self._drain, name="sandboxrun-result", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            while self.budget is None or self.budget > 0:
                # maxlength: a forged message header cannot make recv_bytes allocate more.
                chunk = self.connection.recv_bytes(_MESSAGE)
                if self.budget is not None:
                    chunk = chunk[: self.budget]
                    self.budget -= len(chunk)
                self.chunks.append(memoryview(chunk))
            log.warning("a worker sent more than the longest result frame allowed: the rest is"
                        " not read (its result fails as too large or malformed)")  # fmt: skip
        except (EOFError, OSError):  # the last writer is gone, the pipe broke, or a bad message
            pass
        finally:
            # Closed as soon as we stop reading: a worker still writing gets EPIPE instead of
            # blocking on a pipe nobody reads until its timeout.
            self.connection.close()

    def next_chunk(self) -> memoryview | None:
        """A chunk, waiting for the writer's end when none is there; None at end of file."""
        if not self.chunks:
            self.thread.join(_DRAIN_GRACE)
            if self.thread.is_alive():
                log.warning("a result pipe is still open %ss after its task's tree was killed"
                            " (an escaped process holds it?): the result is read as it stands",
                            _DRAIN_GRACE)  # fmt: skip
        return self.chunks[0] if self.chunks else None

    def consume(self, count: int) -> None:
        head = self.chunks[0]
        if count >= len(head):
            self.chunks.popleft()
        else:
            self.chunks[0] = head[count:]

    def close(self) -> None:
        if not self.thread.is_alive():  # else the thread still reads it: leave it to the thread
            self.connection.close()


_handles: dict[Any, Any] = {}  # handle -> _Result | Connection (control) | int (sentinel)
_numbers = itertools.count(1 << 20)


def _new(item: Any) -> int:
    handle = next(_numbers)
    _handles[handle] = item
    return handle


def result_pipe(max_bytes: int | None = None) -> tuple[int, Connection]:
    pair: tuple[Any, Any] = multiprocessing.Pipe(duplex=False)  # PipeConnection on Windows
    return _new(_Result(pair[0], max_bytes)), pair[1]


def control_pipe() -> tuple[Connection, int]:
    pair: tuple[Any, Any] = multiprocessing.Pipe(duplex=False)
    return pair[0], _new(pair[1])


def exit_handle(process: Any) -> int:
    return _new(process.sentinel)  # a pipe on POSIX, the process handle on Windows


def read(handle: int, size: int) -> bytes:
    result: _Result = _handles[handle]
    chunk = result.next_chunk()
    if chunk is None:
        return b""
    data = bytes(chunk[:size])
    result.consume(len(data))
    return data


def readinto(handle: int, view: memoryview) -> int:
    result: _Result = _handles[handle]
    chunk = result.next_chunk()
    if chunk is None:
        return 0
    count = min(len(chunk), len(view))
    view[:count] = chunk[:count]
    result.consume(count)
    return count


def write(handle: int, data: bytes | memoryview) -> int:
    """The go frame, in one message: the worker is ours until it has read it, so it reads."""
    connection: Connection = _handles[handle]
    connection.send_bytes(data)
    return len(data)


def close(handle: int) -> None:
    item = _handles.pop(handle, None)
    if isinstance(item, (_Result, Connection)):
        item.close()  # a sentinel is the process object's: process.close() releases it


class Selector(selectors.BaseSelector):
    """The slice of ``selectors.BaseSelector`` the scheduler uses, over ``wait``.

    A write handle is always ready (writes block instead); a result handle never is (its
    thread reads it); sentinels and raw fds (a kernel backend's event fd, POSIX only) are
    waited on.
    """

    def __init__(self) -> None:
        self._keys: dict[FileDescriptorLike, selectors.SelectorKey] = {}

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        handle = int(fileobj)  # type: ignore[arg-type]  # our handles are ints
        key = selectors.SelectorKey(handle, handle, events, data)
        self._keys[handle] = key
        return key

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._keys.pop(int(fileobj))  # type: ignore[arg-type]

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return dict(self._keys)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        writable = [(key, selectors.EVENT_WRITE) for key in self._keys.values()
                    if key.events & selectors.EVENT_WRITE]  # fmt: skip
        if writable:
            return writable
        waited: dict[Any, selectors.SelectorKey] = {}
        for handle, key in self._keys.items():
            item = _handles.get(handle, handle)
            if not isinstance(item, _Result):
                waited[item] = key
        ready = multiprocessing.connection.wait(list(waited), timeout)
        return [(waited[item], selectors.EVENT_READ) for item in ready]

    def close(self) -> None:
        self._keys.clear()


def write_all(connection: Connection, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _MESSAGE):
        connection.send_bytes(view[start : start + _MESSAGE])


_pending: dict[int, bytearray] = {}  # the worker's unread part of its control messages


def read_exactly(connection: Connection, size: int) -> bytes | None:
    buffer = _pending.setdefault(id(connection), bytearray())
    while len(buffer) < size:
        try:
            buffer += connection.recv_bytes()
        except (EOFError, OSError):
            return None
    data = bytes(buffer[:size])
    del buffer[:size]
    return data
