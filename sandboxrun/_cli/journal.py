"""The batch journal: one MAC'd JSON line per finished file, the only thing ``--resume`` trusts.

    batch start ── key file (0600, outside OUT) ──> per-batch secret key, in the manager only
    each result ──> record + "input" (stat at queue time) ──> HMAC-SHA256(key, JSON) ──> "mac"
                    └─ one os.write() of one line on an O_APPEND fd (a kill tears at most it)
    --resume ──> every line: JSON? "mac" valid? input unchanged (size, mtime, ctime, inode)?
                 └─ any "no": that file runs again, with a warning saying why

Why a MAC: the converter is hostile and, until tasks are isolated, runs with the manager's uid;
it can append lines to the journal (it even knows where it is: next to ``{output}``). Without the
key, which never enters a task's environment or output folder, it cannot make a line that
``--resume`` accepts, so a forged ``ok`` only makes that file run again; a replayed genuine line
names the input as it was, so it is stale unless that file is untouched. What it still can do
while it shares our uid: find, read or replace the key file (its path follows from the
journal's) -- running tasks under another uid or without the state folder closes that.

Why the input identity: a record says "this file, as it was when queued, was converted". The
identity is the stat taken at queue time: size, ``mtime_ns``, inode and ``ctime_ns``. The kernel
sets ctime on every write, truncate, rename or ``utime()`` and nothing short of changing the
system clock sets it back, so it catches what a content hash would (same size, mtime put back)
for the price of one ``stat()`` -- a hash would reread every input in the manager's single
thread, stalling every other task's timeout for as long as a big file takes to read. A change
at any time after queueing (a converter rewriting its own input included) makes the file run
again on ``--resume``; so does a copy or restore of the input folder (new inodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)  # POSIX; Windows handles are not inherited anyway
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)


def _last_byte(fd: int, size: int) -> bytes:
    if sys.platform == "win32":  # no pread there
        os.lseek(fd, size - 1, os.SEEK_SET)
        return os.read(fd, 1)
    return os.pread(fd, 1, size - 1)

log = logging.getLogger("sandboxrun.cli")

STATE_DIR_ENV = "SANDBOXRUN_STATE_DIR"


# ------------------------------------------------------------------ the key


def default_key_path(journal: Path) -> Path:
    """Where a journal's key lives: a private state folder, never next to the outputs."""
    base = os.environ.get(STATE_DIR_ENV) or os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    if not os.environ.get(STATE_DIR_ENV):
        root = root / "sandboxrun"
    name = hashlib.blake2b(str(journal.resolve()).encode(), digest_size=16).hexdigest()
    return root / "journal-keys" / f"{name}.key"


def new_key(path: Path) -> bytes:
    """A fresh secret for a new journal, written 0600 (replacing any older key atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
    try:
        os.write(fd, key.hex().encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return key


def load_key(path: Path) -> bytes | None:
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as error:
        log.warning(
            "journal key %s unusable (%s): no record of the old journal can be trusted,"
            " every file runs again", path, error,
        )  # fmt: skip
        return None


def _mac(key: bytes, entry: dict[str, Any]) -> str:
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


# ------------------------------------------------------------------ input identity


def stat_identity(path: Path, follow_symlinks: bool) -> dict[str, int]:
    info = os.stat(path, follow_symlinks=follow_symlinks)
    return {
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,  # set by the kernel on every change; utime() cannot
        "ino": info.st_ino,
    }


def queued_identity(path: Path, follow_symlinks: bool) -> dict[str, int] | None:
    """The input's identity when its task is queued; None (never trusted) if it cannot be read."""
    try:
        return stat_identity(path, follow_symlinks)
    except OSError as error:
        log.warning("cannot stat %s (%s): its record will not be trusted by --resume", path, error)
        return None


def stale_reason(record: dict[str, Any], path: Path, follow_symlinks: bool) -> str | None:
    """Why ``record`` no longer describes ``path`` (None: it still does)."""
    recorded = record.get("input")
    if not isinstance(recorded, dict):
        return "its record has no input identity"
    try:
        now = stat_identity(path, follow_symlinks)
    except OSError as error:
        return f"cannot be checked ({error.strerror})"
    changed = [key for key, value in now.items() if recorded.get(key) != value]
    return f"changed since its record ({', '.join(changed)})" if changed else None


# ------------------------------------------------------------------ reading


@dataclasses.dataclass
class JournalContents:
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # last wins
    rejected: int = 0  # lines ignored: torn, not JSON, no or bad MAC


MAX_LINE_BYTES = 1 << 20  # ours are a few KiB (argv, 2000 chars of stderr); longer is foreign
_SHOWN_WARNINGS = 20


def read_journal(path: Path, key: bytes | None, *, warn: bool = True) -> JournalContents:
    """Every record whose MAC checks; every other line is ignored (the first few logged)."""
    contents = JournalContents()
    if not path.exists():
        return contents
    with path.open("rb") as journal:
        for number, line in enumerate(_lines(journal), 1):
            entry, problem = _verified(line, key) if line is not None else (None, "too long")
            if entry is not None:
                contents.records[entry["file"]] = entry
            elif problem:
                contents.rejected += 1
                if warn and contents.rejected <= _SHOWN_WARNINGS:
                    log.warning("journal %s line %d ignored: %s", path, number, problem)
    if warn and contents.rejected > _SHOWN_WARNINGS:
        log.warning("journal %s: %d lines ignored in all", path, contents.rejected)
    return contents


def _lines(journal: BinaryIO) -> Iterator[bytes | None]:
    """Each line, or None for one over MAX_LINE_BYTES (skipped without holding it in memory)."""
    while line := journal.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = journal.readline(MAX_LINE_BYTES)
        yield None


def _verified(line: bytes, key: bytes | None) -> tuple[dict[str, Any] | None, str]:
    if not line.strip():
        return None, ""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON (a torn or foreign line)"
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None, "not a record"
    mac = entry.pop("mac", None)
    if key is None or not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, entry)):
        return None, f"bad or missing MAC for {entry['file']!r} (forged, or another journal's)"
    return entry, ""


# ------------------------------------------------------------------ writing


class Journal:
    """The manager's append-only writer: one sealed line per ``write()``.

    The file is opened for each record and closed right after: the manager forks its workers
    while results come in, and a fork copies every open descriptor (``O_CLOEXEC`` only acts at
    exec), so a journal held open would sit in every worker, one ``/proc/$PPID/fd`` away from
    its converter. An open and a close per finished file cost microseconds.
    """

    def __init__(self, path: Path, key: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path, self._key = path, key
        self._size = 0
        fd = self._open()
        try:
            self._resync(fd, "a torn last line (a crash mid-append)")
        finally:
            os.close(fd)

    def _open(self) -> int:
        # O_NOFOLLOW: a symlink swapped in for the journal does not turn our appends into
        # writes to its target. O_CLOEXEC: no command started meanwhile inherits it.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW
        return os.open(self._path, flags, 0o600)

    def _resync(self, fd: int, what: str) -> None:
        """Start our next line on a fresh line, whatever was appended since our last write."""
        size = os.fstat(fd).st_size
        if size != self._size and self._size:
            log.warning(
                "journal %s: %d bytes appended by someone else; --resume ignores any line"
                " without our MAC", self._path, size - self._size,
            )  # fmt: skip
        if size and _last_byte(fd, size) != b"\n":
            log.warning("journal %s ends in %s: starting a new line", self._path, what)
            os.write(fd, b"\n")
        self._size = os.fstat(fd).st_size

    def write(self, entry: dict[str, Any]) -> None:
        data = json.loads(json.dumps(entry, default=str))  # exactly what a reader will see
        data["mac"] = _mac(self._key, data)
        line = (json.dumps(data) + "\n").encode()
        fd = self._open()
        try:
            if os.fstat(fd).st_size != self._size:
                self._resync(fd, "a partial foreign line")
            # One write() per line: a kill can tear at most the line being written.
            written = os.write(fd, line)
            if written != len(line):
                log.warning(
                    "journal %s: short write (%d of %d bytes)", self._path, written, len(line)
                )
            self._size = os.fstat(fd).st_size
        finally:
            os.close(fd)
