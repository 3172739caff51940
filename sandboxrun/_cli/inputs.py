"""The input folder -> the regular files to run, sorted, and what was left out and why.

Only regular files are run. A symlink is not followed unless the user says ``--follow-symlinks``
(it could point anywhere: ``/etc/shadow``, another user's upload); even then a symlink to a
directory is not walked (no loops) and the target must be a regular file. FIFOs, sockets and
devices are never run: opening a FIFO blocks a converter for ever, a device reads without end.
Each skipped entry is reported to the user, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Skipped:
    relative: Path
    reason: str


@dataclasses.dataclass
class Inputs:
    files: list[Path] = dataclasses.field(default_factory=list)  # relative to the input folder
    skipped: list[Skipped] = dataclasses.field(default_factory=list)


def list_inputs(input_dir: Path, *, follow_symlinks: bool = False) -> Inputs:
    found = Inputs()
    # Depth-first with an explicit stack, in sorted order: a folder nested ten thousand deep
    # (the attacker chooses the tree) must not hit Python's recursion limit.
    stack = [Path()]
    while stack:
        relative = stack.pop()
        try:
            with os.scandir(input_dir / relative) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            found.skipped.append(Skipped(relative, f"folder not readable ({error.strerror})"))
            continue
        folders = []
        for entry in entries:
            path = relative / entry.name
            if entry.is_dir(follow_symlinks=False):
                folders.append(path)
                continue
            reason = _reason_to_skip(entry, follow_symlinks)
            if reason is None:
                found.files.append(path)
            else:
                found.skipped.append(Skipped(path, reason))
        stack.extend(reversed(folders))
    found.files.sort()
    return found


def _reason_to_skip(entry: os.DirEntry[str], follow_symlinks: bool) -> str | None:
    if entry.is_symlink():
        if not follow_symlinks:
            return f"symlink to {_target(entry.path)} (not followed without --follow-symlinks)"
        try:
            mode = os.stat(entry.path).st_mode
        except OSError as error:
            return f"symlink that cannot be followed ({error.strerror})"
        if stat.S_ISDIR(mode):
            return "symlink to a directory (never walked)"
        return None if stat.S_ISREG(mode) else f"symlink to a {_kind(mode)}"
    mode = entry.stat(follow_symlinks=False).st_mode
    return None if stat.S_ISREG(mode) else _kind(mode)


def _target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"
