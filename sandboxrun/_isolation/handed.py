"""Which paths a task was handed: what its call names, the folder it runs in, what it was given.

Portable (runs in the manager). Under the default profile a task runs as a uid of its own that
owns no file of the host (``Isolation.user``); what this module returns is mounted into its
view idmapped (``_idmap``), so on those paths alone it acts as the manager would: a 0600 upload
in a 0700 ``tempfile.mkdtemp()`` folder is readable, and its output lands owned by the manager.

The inference, value by value (``args``, ``kwargs`` values and keys, nested in lists, tuples,
sets and dicts up to ``MAX_DEPTH`` levels and ``MAX_VALUES`` values; a ``CommandTask``'s argv,
its shell string split as a shell would, its ``cwd`` and ``stdin_file``):

- a value counts when it is a ``str``, ``bytes`` or ``os.PathLike`` that is an **absolute path**,
  or a **relative path that exists** from the manager's working folder (``"utf-8"``, ``"w"`` or a
  URL do not); NUL bytes, newlines and over-long strings never count;
- it is resolved (symlinks followed here, in the manager; the task's side then opens every
  component without following one, so a swap in between fails instead of redirecting);
- an existing folder is handed itself; an existing file hands **its folder** (so writing a
  temporary file beside it and renaming it over works); a missing path hands **its first
  existing parent**, never one above it (``out/x.pdf`` in an existing ``out``: ``out``);
- the manager's working folder and ``read_write_paths`` (the profile's and the task's) are
  handed too;
- **never handed**: ``/``; the system folders and everything in them (``SYSTEM``); the shared
  top folders themselves (``SHARED``: ``/tmp``, ``/home``, ``/srv``...: a file directly in one
  is handed alone, see below); a folder that is, or holds, a folder of the manager's
  ``sys.path`` or ``PATH``, the Python installation (or is inside it), the manager's home, or
  any home-like folder (one holding ``.ssh``, ``.bashrc``, ``.profile``...). A file whose folder
  is directly in a shared folder (``FILE_ALONE``: ``/tmp``, ``/srv``...) is handed alone (a
  bind of that file: read and written in place, no rename beside it); a missing one there gets
  nothing, and the task meets that folder as any local user would (``/tmp`` is writable by all:
  its output lands there owned by the task's uid). Any other file in a folder never handed
  (``~/.bashrc``, ``/etc/passwd``) is not handed.

Paths inside another handed folder are dropped (the outer mount covers them).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shlex
import sys
from collections.abc import Iterable, Iterator
from typing import Any

MAX_DEPTH = 4
MAX_VALUES = 10_000
MAX_PATH = 4096

#: Never handed, nor anything inside them.
SYSTEM = (
    "/usr", "/etc", "/boot", "/efi", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/proc", "/sys", "/dev", "/run", "/var/run", "/var/lock", "/var/log", "/var/cache",
    "/var/spool", "/var/mail", "/var/backups", "/var/lib/dpkg", "/var/lib/apt", "/snap",
)  # fmt: skip
#: Never handed themselves (what is inside them may be).
SHARED = (
    "/", "/tmp", "/var/tmp", "/var", "/var/lib", "/home", "/root", "/srv", "/opt", "/mnt",
    "/media", "/dev/shm", "/usr/local",
)  # fmt: skip
#: Shared folders a file directly inside which is handed alone (a bind of that one file).
FILE_ALONE = ("/tmp", "/var/tmp", "/dev/shm", "/srv", "/mnt", "/media")
#: A folder holding one of these is someone's home: never handed (start-up files, keys).
HOME_MARKS = (
    ".ssh", ".bashrc", ".bash_profile", ".profile", ".zshrc", ".bash_login", ".gnupg", ".config",
)  # fmt: skip


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _protected() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folders that may not be handed nor any of their ancestors, folders that may not be
    handed nor anything inside them), as real paths; recomputed when sys.path, PATH or HOME
    change."""
    path = os.environ.get("PATH", "")
    return _protected_for(tuple(sys.path), path, os.path.expanduser("~"))


@functools.lru_cache(maxsize=8)
def _protected_for(
    sys_path: tuple[str, ...], path: str, home: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    code = [p for p in sys_path if p] + path.split(os.pathsep)
    installation = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(__file__)]
    ancestors = {os.path.realpath(p) for p in [*code, home, *installation] if os.path.isabs(p)}
    inside = {os.path.realpath(p) for p in installation}
    inside.add(os.path.realpath(os.path.dirname(os.path.dirname(__file__))))  # sandboxrun
    return tuple(sorted(ancestors)), tuple(sorted(inside))


def never_handed(folder: str) -> bool:
    """True for a folder (a real path) that the rule above never hands to a task."""
    if folder in SHARED or any(_inside(folder, system) for system in SYSTEM):
        return True
    ancestors, inside = _protected()
    if any(_inside(protected, folder) for protected in ancestors):
        return True
    if any(_inside(folder, protected) for protected in inside):
        return True
    return any(os.path.lexists(os.path.join(folder, mark)) for mark in HOME_MARKS)


def _values(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > MAX_DEPTH:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _values(key, depth + 1)
            yield from _values(item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _values(item, depth + 1)
    else:
        yield value


def _as_path(value: Any) -> str | None:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, str) or not value or len(value) > MAX_PATH:
        return None
    if "\0" in value or "\n" in value or "://" in value:
        return None
    return value


def _handed_for(text: str, cwd: str | None) -> str | None:
    """The path ``text`` hands, or None."""
    if os.path.isabs(text):
        path = os.path.normpath(text)
    elif cwd is not None and os.path.lexists(os.path.join(cwd, text)):
        path = os.path.normpath(os.path.join(cwd, text))
    else:
        return None
    try:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            return None if never_handed(real) else real
        if os.path.exists(real):
            folder = os.path.dirname(real)
            if not never_handed(folder):
                return folder
            alone = folder in FILE_ALONE and os.path.basename(real) not in HOME_MARKS
            return real if alone else None
        parent = os.path.dirname(path)
        while parent and not os.path.exists(parent):  # the first existing parent, no further
            parent = os.path.dirname(parent)
        parent = os.path.realpath(parent or "/")
        return None if never_handed(parent) or not os.path.isdir(parent) else parent
    except (OSError, ValueError):
        return None


def _candidates(task: Any) -> Iterable[Any]:
    kwargs = getattr(task, "kwargs", {}) or {}
    argv = kwargs.get("argv")
    if kwargs.get("shell") and isinstance(argv, str):  # a CommandTask's shell string
        with contextlib.suppress(ValueError):  # unbalanced quotes: no tokens of it
            yield from shlex.split(argv)
    yield from getattr(task, "args", ())
    yield kwargs
    yield getattr(task, "read_write_paths", ())


def handed_paths(task: Any, cwd: str | None, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The real paths ``task`` is handed (see the module's rule), outermost first."""
    found: set[str] = set()
    command_cwd = (getattr(task, "kwargs", {}) or {}).get("cwd")
    folders = [cwd, command_cwd if isinstance(command_cwd, str) else None, *extra]
    for folder in folders:
        if folder and os.path.isabs(folder):
            real = os.path.realpath(folder)
            if os.path.isdir(real) and not never_handed(real):
                found.add(real)
    for value in itertools.islice(_values(list(_candidates(task))), MAX_VALUES):
        text = _as_path(value)
        if text is not None:
            handed = _handed_for(text, cwd)
            if handed is not None:
                found.add(handed)
    kept: list[str] = []
    for path in sorted(found):  # a parent sorts before what is inside it
        if not any(_inside(path, outer) for outer in kept):
            kept.append(path)
    return tuple(kept)
