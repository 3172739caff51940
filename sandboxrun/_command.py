"""Command tasks: an external program as a task, under the same limits and the same TaskResult.

The worker (already inside the task's sandbox) starts the program, feeds its stdin, and keeps at
most ``output_limit_bytes`` of stdout and of stderr: the rest is read and dropped, so a flood can
neither block the program on a full pipe nor grow anybody's memory. The program and everything
it starts are in the task's cgroup, so the limits cover the whole tree.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

from . import _linux
from ._errors import SandboxrunError
from ._task import Task, _short

DEFAULT_OUTPUT_LIMIT = 1 << 20
_CHUNK = 1 << 16


@dataclasses.dataclass
class CommandResult:
    """What a command task returns: its status and its captured, capped output."""

    argv: list[str]
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0  # total produced, kept or not
    stderr_bytes: int = 0


class CommandFailed(SandboxrunError):
    """The command ran and exited non-zero (or died of a signal); ``.result`` has its output."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        if result.returncode < 0:
            status = f"was killed by signal {-result.returncode}"
        else:
            status = f"exited with status {result.returncode}"
        tail = result.stderr[-500:].decode(errors="replace").strip()
        super().__init__(f"{result.argv[0]} {status}" + (f": {tail}" if tail else ""))

    def __reduce__(self) -> tuple[type[CommandFailed], tuple[CommandResult]]:
        return (type(self), (self.result,))


def _pump(
    process: subprocess.Popen[bytes], stdin_data: bytes | None, limit: int
) -> tuple[dict[int, bytearray], dict[int, int]]:
    """Feed stdin and drain stdout/stderr together, keeping at most ``limit`` bytes of each."""
    kept: dict[int, bytearray] = {}
    total: dict[int, int] = {}
    pending = memoryview(stdin_data or b"")
    with selectors.DefaultSelector() as selector:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                kept[stream.fileno()], total[stream.fileno()] = bytearray(), 0
                selector.register(stream, selectors.EVENT_READ)
        if process.stdin is not None:
            if pending:
                if sys.platform != "win32":  # (Windows' select takes no pipes: POSIX only)
                    os.set_blocking(process.stdin.fileno(), False)
                selector.register(process.stdin, selectors.EVENT_WRITE)
            else:
                process.stdin.close()
        while selector.get_map():
            for key, _ in selector.select():
                fd = key.fileobj.fileno()  # type: ignore[union-attr]
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(fd, pending[:_CHUNK]) :]
                    except BrokenPipeError:  # the program does not want the rest: fine
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(key.fileobj)
                        process.stdin.close()
                    continue
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                total[fd] += len(chunk)
                room = limit - len(kept[fd])
                if room > 0:
                    kept[fd] += chunk[:room]
    return kept, total


def execute(
    argv: Sequence[str] | str,
    stdin_data: bytes | None = None,
    stdin_file: str | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    shell: bool = False,
    capture_output: bool = True,
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT,
    check: bool = True,
) -> CommandResult:
    """Run one command to its end (runs inside the worker)."""
    stdin: int | None
    if stdin_file is not None:
        stdin = os.open(stdin_file, os.O_RDONLY)
    elif stdin_data is not None:
        stdin = subprocess.PIPE
    else:
        stdin = subprocess.DEVNULL
    pipe = subprocess.PIPE if capture_output else None
    try:
        # preexec runs between fork and exec in the (single-threaded) worker: if the worker is
        # killed, the command goes too, instead of running on unwatched.
        process = subprocess.Popen(
            argv, stdin=stdin, stdout=pipe, stderr=pipe, cwd=cwd,
            env=None if env is None else dict(env), shell=shell,
            preexec_fn=_linux.die_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip
    finally:
        if isinstance(stdin, int) and stdin >= 0:
            os.close(stdin)
    out = process.stdout.fileno() if process.stdout else -1
    err = process.stderr.fileno() if process.stderr else -1
    with process:
        if capture_output:
            kept, total = _pump(process, stdin_data, output_limit_bytes)
        else:
            if process.stdin is not None:
                process.communicate(stdin_data)
            kept, total = {}, {}
        returncode = process.wait()
    result = CommandResult(
        argv=[argv] if isinstance(argv, str) else list(argv),
        returncode=returncode,
        stdout=bytes(kept.get(out, b"")),
        stderr=bytes(kept.get(err, b"")),
        stdout_bytes=total.get(out, 0),
        stderr_bytes=total.get(err, 0),
    )
    result.stdout_truncated = result.stdout_bytes > len(result.stdout)
    result.stderr_truncated = result.stderr_bytes > len(result.stderr)
    if check and returncode != 0:
        raise CommandFailed(result)
    return result


class CommandTask(Task):
    """An external program as a task: ``CommandTask(["convert", "in.png", "out.pdf"])``.

    No shell unless ``shell=True`` (then ``argv`` is one string). ``stdin`` is bytes to feed, or
    ``stdin_file`` a path to read from. stdout and stderr are captured up to
    ``output_limit_bytes`` each (``*_truncated`` says when more came); with
    ``capture_output=False`` they go where the manager's own output goes. A non-zero exit fails
    the task with ``CommandFailed`` (its ``.result`` has the output) unless ``check=False``.
    ``read_write_paths``: folders this task alone may write under strict isolation.
    """

    __slots__ = ()

    def __init__(
        self,
        argv: Sequence[str] | str,
        *,
        stdin: bytes | None = None,
        stdin_file: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        shell: bool = False,
        capture_output: bool = True,
        output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT,
        check: bool = True,
        read_write_paths: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        if shell:
            if not isinstance(argv, str):
                raise TypeError("with shell=True, argv must be one command string")
        elif isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv must be a non-empty list of strings (or use shell=True)")
        elif not all(isinstance(arg, (str, os.PathLike)) for arg in argv):
            raise TypeError("every argv element must be a string or path")
        if stdin is not None and stdin_file is not None:
            raise ValueError("give stdin or stdin_file, not both")
        if stdin is not None and not isinstance(stdin, (bytes, bytearray)):
            raise TypeError("stdin must be bytes")
        if isinstance(output_limit_bytes, bool) or not isinstance(output_limit_bytes, int):
            raise TypeError("output_limit_bytes must be an int")
        if output_limit_bytes < 0:
            raise ValueError("output_limit_bytes must be >= 0")
        super().__init__(
            execute,
            kwargs={
                "argv": argv if shell else [os.fspath(arg) for arg in argv],
                "stdin_data": None if stdin is None else bytes(stdin),
                "stdin_file": None if stdin_file is None else os.fspath(stdin_file),
                "cwd": None if cwd is None else os.fspath(cwd),
                "env": None if env is None else dict(env),
                "shell": shell,
                "capture_output": capture_output,
                "output_limit_bytes": output_limit_bytes,
                "check": check,
            },
        )
        writable = tuple(os.fspath(path) for path in read_write_paths)
        if not all(isinstance(path, str) and os.path.isabs(path) for path in writable):
            raise ValueError(f"read_write_paths must be absolute paths, got {writable!r}")
        if writable:
            self.read_write_paths = writable

    @property
    def argv(self) -> list[str] | str:
        argv: list[str] | str = self.kwargs["argv"]
        return argv

    def __repr__(self) -> str:
        return f"CommandTask({_short(self.argv)})"
