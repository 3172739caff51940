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
import struct

LENGTH = struct.Struct(">Q")
RESULT_PREFIX = struct.Struct(">QQ")

# header["kind"]
RETURNED = "returned"
RAISED = "raised"
RESULT_UNPICKLABLE = "result-unpicklable"
EXCEPTION_UNPICKLABLE = "exception-unpicklable"
ENTER_FAILED = "enter-failed"  # the worker could not move itself into its sandbox


@dataclasses.dataclass
class Header:
    kind: str
    type_name: str = ""
    text: str = ""
    traceback_text: str = ""
    max_rss_bytes: int = 0
    cpu_time_seconds: float = 0.0
    exit_code: int = 0

    def to_builtins(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_builtins(cls, data: dict[str, object]) -> Header:
        return cls(**data)  # type: ignore[arg-type]


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Blocking write of every byte (the worker side; the manager never blocks)."""
    import os

    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
