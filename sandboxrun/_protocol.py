"""The two frames that cross between the manager and one worker, over one pipe pair per task.

control (manager -> worker), only when the worker must wait: it carries the pickled task under
spawn/forkserver, or is the go signal after a parent-side attach (empty payload):
    u64 length | pickled Task or nothing
result (worker -> manager), sent once:
    u64 header length | u64 body length | header | body

The header is a pickle of builtins only (it always unpickles); the body is the pickled return
value or exception, which may not. Keeping them apart lets the manager say *what* failed to
arrive instead of losing the task.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import pickle
import struct
from typing import Any

from . import _transport as transport

LENGTH = struct.Struct(">Q")
RESULT_PREFIX = struct.Struct(">QQ")

# header["kind"]
RETURNED = "returned"
RAISED = "raised"
RESULT_UNPICKLABLE = "result-unpicklable"
EXCEPTION_UNPICKLABLE = "exception-unpicklable"
ENTER_FAILED = "enter-failed"  # the worker could not move itself into its sandbox

# The worker's own exit codes when it sends no result of the task (the manager reports them in
# WorkerDied). 70 is also what the bare fork launcher exits with if the worker code itself raised.
EXIT_MANAGER_GONE = 70  # the control pipe closed before the go frame: the manager gave up on us
EXIT_ENTER_FAILED = 71  # the worker could not enter its sandbox (an ENTER_FAILED frame was sent)

_MMAP_FROM = 1 << 20  # bigger frames land in an anonymous mapping: no zero-fill pass, freed at once
_READ_MAX = 16 << 20


@dataclasses.dataclass
class Header:
    kind: str
    type_name: str = ""
    text: str = ""
    traceback_text: str = ""
    max_rss_bytes: int = 0
    cpu_time_seconds: float = 0.0

    def to_builtins(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_builtins(cls, data: dict[str, object]) -> Header:
        return cls(**data)  # type: ignore[arg-type]


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
    pickle.Pickler(chunks, protocol=5).dump(value)
    return chunks


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Blocking write of every byte (the worker side; the manager never blocks)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class ResultReader:
    """Reassembles one result frame from a non-blocking pipe, whatever the reads return."""

    def __init__(self) -> None:
        self.prefix = bytearray()
        self.buffer: bytearray | mmap.mmap | None = None
        self.size = 0
        self.filled = 0

    @property
    def started(self) -> bool:
        return bool(self.prefix)

    @property
    def complete(self) -> bool:
        return self.buffer is not None and self.filled == self.size

    def feed(self, fd: int) -> bool:
        """Read what is there; True when nothing more will come (frame complete, EOF, error)."""
        while True:
            try:
                if self.buffer is None:
                    chunk = transport.read(fd, RESULT_PREFIX.size - len(self.prefix))
                    if not chunk:
                        return True
                    self.prefix += chunk
                    if len(self.prefix) == RESULT_PREFIX.size:
                        head, body = RESULT_PREFIX.unpack(self.prefix)
                        self.size = head + body
                        self.buffer = (
                            mmap.mmap(-1, self.size) if self.size >= _MMAP_FROM
                            else bytearray(self.size)
                        )  # fmt: skip
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

    def take(self) -> tuple[Header, memoryview] | None:
        """The header and a view of the body of a complete frame (release the view, then
        call ``close``); None when the frame is incomplete."""
        if not self.complete or self.buffer is None:
            return None
        head_size, _ = RESULT_PREFIX.unpack(self.prefix)
        view = memoryview(self.buffer)
        header = Header.from_builtins(pickle.loads(view[:head_size]))
        return header, view[head_size:]

    def close(self) -> None:
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()
        self.buffer = None
