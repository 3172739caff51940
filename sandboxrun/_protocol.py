"""The two frames that cross between the manager and one worker, over one pipe pair per task.

control (manager -> worker), only when the worker must wait: it carries the pickled task under
spawn/forkserver, or is the go signal after a parent-side attach (empty payload):
    u64 length | pickled Task or nothing
result (worker -> manager), sent once:
    u64 header length | u64 body length | header | body

The header is the fixed binary record of ``_header`` (never a pickle: nothing in it can run);
the body is the pickled return value or exception, decoded by ``_result_types`` under the
manager's result-type rules. Keeping them apart lets the manager say *what* failed to arrive
instead of losing the task.

Both lengths are the worker's word, so ``ResultReader`` checks them (``check_frame_lengths``)
before it allocates anything: a frame over ``max_result_bytes`` is not read at all. The reader
then stops, the scheduler closes the pipe, and a worker still writing gets EPIPE (or, if it
ignores that, is ended by its limits like any other task): the manager never blocks on it.
"""

from __future__ import annotations

import copyreg
import errno
import mmap
import pickle
import struct
from typing import Any

from . import _transport as transport
from ._errors import ProtocolError, ResultTooLarge
from ._header import (
    ENTER_FAILED,
    EXCEPTION_UNPICKLABLE,
    RAISED,
    RESULT_UNPICKLABLE,
    RETURNED,
    Header,
    check_body_for_kind,
    check_frame_lengths,
    decode,
)
from ._limits import DEFAULT_MAX_RESULT_BYTES

LENGTH = struct.Struct(">Q")
RESULT_PREFIX = struct.Struct(">QQ")

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "ENTER_FAILED",
    "EXCEPTION_UNPICKLABLE",
    "RAISED",
    "RESULT_UNPICKLABLE",
    "RETURNED",
    "Header",
]  # the header kinds, re-exported: the worker and the outcome name them from here

# The worker's own exit codes when it sends no result of the task (the manager reports them in
# WorkerDied). 70 is also what the bare fork launcher exits with if the worker code itself raised.
EXIT_MANAGER_GONE = 70  # the control pipe closed before the go frame: the manager gave up on us
EXIT_ENTER_FAILED = 71  # the worker could not enter its sandbox (an ENTER_FAILED frame was sent)

_MMAP_FROM = 1 << 20  # bigger frames land in an anonymous mapping: no zero-fill pass, freed at once
_READ_MAX = 16 << 20


class Chunks:
    """A pickle sink that keeps references: large bytes objects are handed to ``write`` whole,
    so pickling a 256 MiB result costs no second 256 MiB copy in the worker."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.parts.append(data)
        self.size += len(data)
        return len(data)


def pickle_parts(value: Any) -> Chunks:
    chunks = Chunks()
    pickler = pickle.Pickler(chunks, protocol=5)
    # Exceptions pickle the stdlib way, whatever reducers a library registered in copyreg
    # (distributed installs tblib's for every exception class, inherited by our workers): those
    # name a module function, which the manager's restricted unpickler refuses.
    pickler.dispatch_table = {
        cls: reducer
        for cls, reducer in copyreg.dispatch_table.items()
        if not (isinstance(cls, type) and issubclass(cls, BaseException))
    }
    pickler.dump(value)
    return chunks


class ResultReader:
    """Reassembles one result frame from a non-blocking pipe, whatever the reads return.

    ``error`` is set (and reading stops) when the prefix announces a frame the manager will not
    take: a header length no header can have (``ProtocolError``) or a body over
    ``max_result_bytes`` (``ResultTooLarge``). Nothing is allocated for such a frame.
    """

    def __init__(self, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
        self.max_result_bytes = max_result_bytes
        self.prefix = bytearray()
        self.buffer: bytearray | mmap.mmap | None = None
        self.size = 0
        self.filled = 0
        self.error: ProtocolError | ResultTooLarge | None = None

    @property
    def started(self) -> bool:
        return bool(self.prefix)

    @property
    def complete(self) -> bool:
        return self.buffer is not None and self.filled == self.size

    def feed(self, fd: int) -> bool:
        """Read what is there; True when nothing more will come (frame complete, EOF, error,
        refused frame)."""
        while True:
            try:
                if self.buffer is None:
                    if self.error is not None:
                        return True
                    chunk = transport.read(fd, RESULT_PREFIX.size - len(self.prefix))
                    if not chunk:
                        return True
                    self.prefix += chunk
                    if len(self.prefix) == RESULT_PREFIX.size:
                        self._allocate()
                    continue
                if self.filled == self.size:
                    return True
                with memoryview(self.buffer) as view:
                    count = transport.readinto(fd, view[self.filled : self.filled + _READ_MAX])
                if count == 0:
                    return True
                self.filled += count
            except BlockingIOError:
                return False
            except OSError as error:
                return error.errno not in (errno.EAGAIN, errno.EINTR)

    def _allocate(self) -> None:
        head, body = RESULT_PREFIX.unpack(self.prefix)
        try:  # before any allocation: both lengths are the worker's word
            check_frame_lengths(head, body, max_result_bytes=self.max_result_bytes)
        except (ProtocolError, ResultTooLarge) as error:
            self.error = error
            return
        self.size = head + body
        self.buffer = mmap.mmap(-1, self.size) if self.size >= _MMAP_FROM else bytearray(self.size)

    def take(self) -> tuple[Header, memoryview] | None:
        """The header and a view of the body of a complete frame (release the view, then
        call ``close``); None when the frame is incomplete. ``ProtocolError`` if the header
        does not decode or does not fit the body (the caller must still ``close``)."""
        if not self.complete or self.buffer is None:
            return None
        head_size, body_size = RESULT_PREFIX.unpack(self.prefix)
        with memoryview(self.buffer) as whole:
            header = decode(whole[:head_size])
        check_body_for_kind(header, body_size)
        return header, memoryview(self.buffer)[head_size:]

    def close(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()
        self.buffer = None
