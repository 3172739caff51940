"""The result frame's header: a fixed binary record the manager can check field by field.

    result frame:  u64 header length | u64 body length | header | body
    header:        magic "SBR1" | u8 kind | u8 0 | u16 0 | u64 max_rss_bytes
                   | f64 cpu_time_seconds | u32 len(type_name) | u32 len(text)
                   | u32 len(traceback_text) | the three UTF-8 texts (surrogatepass)

(No exit code: the manager reads the process's real exit status from the kernel.)

Why a struct and not JSON: every field has one width and one type, so ``decode`` has nothing to
interpret (no nesting to recurse into, no ``1e999`` turning into ``inf``, no big-int parsing),
and the worker side cannot fail on odd text (lone surrogates pass through). Big-endian like
the frame prefix.

Why ``check_frame_lengths`` comes first: the two lengths are the worker's word. The manager
checks them against ``MAX_HEADER_BYTES`` and ``max_result_bytes`` *before* allocating the
receive buffer, because that buffer is charged to the manager, not to the task's memory limit.

The default ``max_result_bytes`` (``DEFAULT_MAX_RESULT_BYTES``, used when the task has no memory
limit) is 1 GiB: Glasswall users return whole exported files as ``bytes`` (documents of tens to
hundreds of MiB; the benchmark returns 256 MiB, so 4x headroom), while the manager may hold one
receive buffer per running worker, plus the decoded copy, at once. With a memory limit the
default is that limit (see ``_limits.validate_max_result_bytes``): a value the task could hold
in memory always fits, and a task cannot stream more than it could have built.
"""

from __future__ import annotations

import dataclasses
import math
import struct

from ._errors import ProtocolError, ResultTooLarge

RETURNED = "returned"
RAISED = "raised"
RESULT_UNPICKLABLE = "result-unpicklable"
EXCEPTION_UNPICKLABLE = "exception-unpicklable"
ENTER_FAILED = "enter-failed"  # the worker could not move itself into its sandbox
KINDS = (RETURNED, RAISED, RESULT_UNPICKLABLE, EXCEPTION_UNPICKLABLE, ENTER_FAILED)
_BODILESS = frozenset({RESULT_UNPICKLABLE, EXCEPTION_UNPICKLABLE, ENTER_FAILED})

MAGIC = b"SBR1"
_FIXED = struct.Struct(">4sBBHQdIII")
MAX_TEXT_BYTES = 64 << 10  # per text field; the worker clips, the manager refuses longer
MAX_HEADER_BYTES = _FIXED.size + 3 * MAX_TEXT_BYTES
_MAX_RSS = 2**63 - 1
_CUT = "\n[... cut to fit the result header ...]\n"


@dataclasses.dataclass
class Header:
    """What the worker says about its outcome; the body (if any) is the pickled value."""

    kind: str
    type_name: str = ""
    text: str = ""
    traceback_text: str = ""
    max_rss_bytes: int = 0
    cpu_time_seconds: float = 0.0


def _clip(text: str, keep_tail: bool) -> bytes:
    """UTF-8 of ``text`` cut to MAX_TEXT_BYTES on a character boundary (tracebacks keep their
    end, where the error is)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_TEXT_BYTES:
        return data
    cut = _CUT.encode()
    room = MAX_TEXT_BYTES - len(cut)
    if keep_tail:
        tail = data[-room:].decode("utf-8", "ignore").encode("utf-8", "surrogatepass")
        return cut + tail
    head = data[:room].decode("utf-8", "ignore").encode("utf-8", "surrogatepass")
    return head + cut


def encode(header: Header) -> bytes:
    """The header's bytes (worker side). Texts are clipped, numbers clamped into their fields;
    only a ``kind`` outside ``KINDS`` is an error (a bug in the caller)."""
    if header.kind not in KINDS:
        raise ValueError(f"unknown header kind {header.kind!r}")
    texts = (
        _clip(str(header.type_name), keep_tail=False),
        _clip(str(header.text), keep_tail=False),
        _clip(str(header.traceback_text), keep_tail=True),
    )
    cpu = float(header.cpu_time_seconds)
    fixed = _FIXED.pack(
        MAGIC,
        KINDS.index(header.kind),
        0,
        0,
        min(max(int(header.max_rss_bytes), 0), _MAX_RSS),
        cpu if math.isfinite(cpu) and cpu >= 0 else 0.0,
        *map(len, texts),
    )
    return fixed + b"".join(texts)


def decode(data: bytes | bytearray | memoryview) -> Header:
    """The header from the worker's bytes (manager side); ``ProtocolError`` for anything else."""
    with memoryview(data) as view, view.cast("B") as raw:
        if len(raw) < _FIXED.size:
            raise ProtocolError(f"result header too short: {len(raw)} bytes < {_FIXED.size}")
        magic, kind, pad1, pad2, rss, cpu, *sizes = _FIXED.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError(f"result header has bad magic {magic!r} (expected {MAGIC!r})")
        if kind >= len(KINDS):
            raise ProtocolError(f"result header kind {kind} is not one of 0..{len(KINDS) - 1}")
        if pad1 or pad2:
            raise ProtocolError("result header padding is not zero")
        if rss > _MAX_RSS:
            raise ProtocolError(f"result header max_rss_bytes={rss} is out of range")
        if not (math.isfinite(cpu) and cpu >= 0):
            raise ProtocolError(f"result header cpu_time_seconds={cpu!r} is not a finite >= 0")
        if any(size > MAX_TEXT_BYTES for size in sizes):
            raise ProtocolError(f"result header text field over {MAX_TEXT_BYTES} bytes: {sizes}")
        if _FIXED.size + sum(sizes) != len(raw):
            raise ProtocolError(
                f"result header is {len(raw)} bytes, its fields say {_FIXED.size + sum(sizes)}"
            )
        texts: list[str] = []
        offset = _FIXED.size
        for name, size in zip(("type_name", "text", "traceback_text"), sizes, strict=True):
            try:
                texts.append(str(raw[offset : offset + size], "utf-8", "surrogatepass"))
            except UnicodeDecodeError as error:
                raise ProtocolError(f"result header {name} is not UTF-8: {error}") from None
            offset += size
    type_name, text, traceback_text = texts
    return Header(KINDS[kind], type_name, text, traceback_text, rss, cpu)


def check_frame_lengths(header_size: int, body_size: int, *, max_result_bytes: int) -> None:
    """Validate the frame prefix before anything is allocated for the frame.

    ``ProtocolError`` if the header length cannot be a header; ``ResultTooLarge`` if the body is
    longer than ``max_result_bytes`` (the manager then reads nothing more from that worker).
    """
    if not _FIXED.size <= header_size <= MAX_HEADER_BYTES:
        raise ProtocolError(
            f"result header length {header_size} is outside {_FIXED.size}..{MAX_HEADER_BYTES}"
        )
    if body_size > max_result_bytes:
        raise ResultTooLarge(body_size, max_result_bytes)


def check_body_for_kind(header: Header, body_size: int) -> None:
    """Kinds that carry no value come without a body; the others always have one."""
    if header.kind in _BODILESS and body_size:
        raise ProtocolError(f"a {header.kind!r} result frame must not have a body ({body_size})")
    if header.kind not in _BODILESS and not body_size:
        raise ProtocolError(f"a {header.kind!r} result frame must have a body")
