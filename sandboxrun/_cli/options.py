"""Command-line limits -> a ProcessManager, and ``--verbose``; every bad value is one usage line.

The library validates its arguments (and, with the limits work, names each maximum); the CLI
adds the bounds the kernel and Python can represent, so ``--timeout 800h`` or
``--max-processes 99999999`` is exit 2 with the maximum in the message, never a traceback
or a late failure inside the batch. Whatever raises ``ValueError``, ``TypeError`` or
``OverflowError`` while the manager is built is reported the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import cast

import typer

from .._errors import SandboxrunError
from .._executor import ManagerOptions
from .._isolation import (
    STRICT,
    Isolation,
    choose,
    resolve,
    start_method_reason,
    unavailable_reason,
)
from .._launch import default_start_method
from .._limits import GIB, MAX_PROCESSES, parse_duration, parse_size
from .._manager import BackendName, ProcessManager
from .verdicts import EXIT_USAGE

# What the kernel and Python can hold (the library's own maxima supersede these once it has them).
MAX_SECONDS = (2**31 - 1) / 1000  # poll/timer arguments are C ints of milliseconds: ~24.8 days
MAX_MEMORY_BYTES = 2**62  # memory.max / memory.limit_in_bytes are signed 64-bit, page-rounded

_HANDLER_MARK = "_sandboxrun_cli_handler"


def fail_usage(message: str) -> typer.Exit:
    typer.echo(f"sandboxrun: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _duration(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"{option} {text} is too long: the maximum is {int(MAX_SECONDS)}s (24 days)"
        )
    return seconds


def _memory(text: str | None) -> float | None:
    if text is None:
        return None
    size = parse_size(text)
    if size > MAX_MEMORY_BYTES:
        raise ValueError(f"--memory {text} is too large: the maximum is {MAX_MEMORY_BYTES // GIB}G")
    return size / GIB


def _processes(count: int | None) -> int | None:
    """``--max-processes``: None (not given) is the library's DEFAULT_MAX_PROCESSES, 0 none."""
    if count is not None and count > MAX_PROCESSES:
        raise ValueError(f"--max-processes {count} is too large: the maximum is {MAX_PROCESSES}")
    return count


def make_manager(
    workers: int | None,
    memory: str | None,
    timeout: str | None,
    cpu_time: str | None,
    max_processes: int | None,
    backend: str,
    cpus: float | None = None,
    isolation: str | Isolation | None = None,
    readable: tuple[str, ...] = (),
    command: list[str] | None = None,
) -> ProcessManager:
    """One parser for sizes and durations (the library's); a bad value is a one-line error.

    ``readable``: folders the commands must read, also through their private /tmp (the batch's
    input); each batch task gets its own writable folder (``CommandTask.read_write_paths``)."""
    try:
        seen = (*readable, *_command_files(command or []))
        return ProcessManager(
            isolation=_isolation(isolation, seen),
            max_workers=workers,
            worker_timeout_seconds=_duration("--timeout", timeout),
            memory_limit_in_gib=_memory(memory),
            cpu_time_limit_seconds=_duration("--cpu-time", cpu_time),
            max_processes=_processes(max_processes),
            backend=cast(BackendName, backend),  # checked by ProcessManager itself
            cpu_quota=cpus,  # --cpus 0.5: validated (and refused on psutil) by the manager
        )
    except (ValueError, TypeError, OverflowError, SandboxrunError) as error:
        raise fail_usage(str(error)) from None


def _isolation(name: str | Isolation | None, readable: tuple[str, ...]) -> Isolation:
    # None: the default for the start method the manager will use (it may have to be "none")
    profile = choose(None, default_start_method()) if name is None else resolve(name)
    return profile.with_paths((), readable) if profile.enabled else profile


_PRIVATE = ("/tmp/", "/var/tmp/")  # a task sees these folders' insides rebuilt (PrivateTmp=)


def batch_isolation(name: str | None, folders: tuple[Path, ...]) -> str | Isolation | None:
    """``batch``'s profile: ``--isolation`` as given, else ``$SANDBOXRUN_ISOLATION`` (the
    operator's default), else "strict" where it works here -- else, as ``choose`` does for
    every default, the manager's default with one warning saying why (``--isolation strict``
    asked for and impossible: a usage error)."""
    if name is None and os.environ.get("SANDBOXRUN_ISOLATION"):
        return None
    if name is not None and name != "strict":
        return name
    reason = (unavailable_reason(STRICT) or start_method_reason(default_start_method())
              or _unreachable(STRICT, folders))  # fmt: skip
    if reason is None:
        return STRICT
    if name == "strict":
        raise fail_usage(f"--isolation strict cannot be had here: {reason}")
    logging.getLogger("sandboxrun.cli").warning(
        "batch: converters do NOT run under the strict profile (%s): they may write outside"
        " their staging folder; see `sandboxrun doctor`, or --isolation to choose", reason,
    )  # fmt: skip
    return None


def _unreachable(profile: Isolation, folders: tuple[Path, ...]) -> str | None:
    """Under another uid (root manager, strict) a folder is reachable only through ancestors
    that others may traverse (o+x) -- but under /tmp, which the task sees rebuilt."""
    if profile.user is None or sys.platform != "linux" or os.geteuid() != 0:
        return None
    for folder in folders:
        real = os.path.realpath(folder)
        if real.startswith(_PRIVATE):
            continue
        for ancestor in [*reversed(Path(real).parents), Path(real)]:
            with contextlib.suppress(OSError):
                mode = ancestor.stat().st_mode
                if not mode & 0o001:
                    return (
                        f"{ancestor} is mode {mode & 0o777:o}: the tasks' uid ({profile.uid_base}"
                        f"+slot) cannot reach {folder} (chmod o+x {ancestor}, or use other folders)"
                    )
    return None


def _command_files(argv: list[str]) -> tuple[str, ...]:
    """The command's own files (its program, a script it is given), kept visible read-only
    through the private /tmp: a checkout under /tmp must still run."""
    found = []
    for index, arg in enumerate(argv):
        path = shutil.which(arg) if index == 0 and "/" not in arg else arg
        if path and os.path.isabs(path) and os.path.exists(path):
            found.append(os.path.realpath(path))
    return tuple(found)


def cluster_options(manager: ProcessManager, backend: str) -> ManagerOptions:
    """The limits of a manager made (so checked) here, as options for a cluster's workers to
    make their own with; ``backend`` as asked (``auto``: each worker's own choice)."""
    return ManagerOptions(
        worker_timeout_seconds=manager.worker_timeout_seconds,
        memory_limit_in_gib=manager.memory_limit_in_gib,
        cpu_time_limit_seconds=manager.cpu_time_limit_seconds,
        max_processes=manager.max_processes,
        backend=cast(BackendName, backend),
        cpu_quota=manager.limits.cpu_quota,
    )


def parse_output_limit(text: str) -> int:
    try:
        return parse_size(text)
    except (ValueError, OverflowError) as error:
        raise fail_usage(str(error)) from None


def set_verbosity(count: int) -> None:
    """``-v``: INFO, ``-vv``: DEBUG, from ``logging.getLogger("sandboxrun")`` to stderr."""
    logger = logging.getLogger("sandboxrun")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)  # one handler, even when the app runs twice in a process
    if count <= 0:
        logger.setLevel(logging.NOTSET)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if count == 1 else logging.DEBUG)
