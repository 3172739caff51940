"""``sandboxrun batch``: one command task per input file, a JSON Lines journal, resumable.

The journal is the batch's memory: one line per finished file, written (and flushed) the moment
its result arrives, so a batch killed at any point — even by SIGKILL — keeps every finished file,
and ``--resume`` skips exactly those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import string
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ._command import CommandFailed, CommandResult, CommandTask
from ._task import TaskResult

PLACEHOLDERS = ("input", "output", "name", "stem", "out_dir")
VERDICTS = ("ok", "failed", "timed out", "out of memory")


def verdict(result: TaskResult) -> str:
    if result.success:
        return "ok"
    if result.timed_out:
        return "timed out"
    if result.out_of_memory:
        return "out of memory"
    return "failed"


def parse_template(template: str) -> list[str]:
    """Split ``--cmd`` like a shell would (no shell runs) and check its placeholders."""
    try:
        argv = shlex.split(template)
    except ValueError as error:
        raise ValueError(f"--cmd: {error}") from None
    if not argv:
        raise ValueError("--cmd is empty")
    for arg in argv:
        for _, field, _, _ in string.Formatter().parse(arg):
            if field is not None and field not in PLACEHOLDERS:
                raise ValueError(
                    f"--cmd: unknown placeholder {{{field}}}; use {', '.join(PLACEHOLDERS)}"
                )
    return argv


def list_inputs(input_dir: Path) -> list[Path]:
    """Every regular file below ``input_dir``, sorted, as paths relative to it."""
    files = []
    for root, dirs, names in os.walk(input_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file():
                files.append(path.relative_to(input_dir))
    return files


def command_for(template: list[str], input_dir: Path, out_dir: Path, relative: Path) -> list[str]:
    """Placeholders are filled per argument, so a file name can never inject shell syntax."""
    output = out_dir / relative
    values = {
        "input": str(input_dir / relative),
        "output": str(output),
        "name": relative.name,
        "stem": relative.stem,
        "out_dir": str(out_dir),
    }
    return [arg.format(**values) for arg in template]


def read_journal(journal: Path) -> dict[str, dict[str, Any]]:
    """{file: its record} for every file the journal records as finished (the last record wins).

    A torn last line (the batch was killed mid-write) is ignored: that file simply runs again.
    """
    done: dict[str, dict[str, Any]] = {}
    if not journal.exists():
        return done
    with journal.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                entry = json.loads(line)
                done[entry["file"]] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return done


def record(relative: Path, result: TaskResult) -> dict[str, Any]:
    """One journal line: every TaskResult field that makes sense in JSON, plus the command's."""
    fields = {
        field.name: getattr(result, field.name)
        for field in dataclasses.fields(result)
        if field.name not in ("task", "result", "exception")
    }
    output: CommandResult | None = result.result
    if isinstance(result.exception, CommandFailed):
        output = result.exception.result
    error = result.exception
    return {
        "file": str(relative),
        "verdict": verdict(result),
        "argv": result.task.kwargs.get("argv"),
        "returncode": None if output is None else output.returncode,
        **fields,
        "exception": None if error is None else f"{type(error).__name__}: {error}"[:2000],
        "stdout_bytes": None if output is None else output.stdout_bytes,
        "stderr_tail": None if output is None else output.stderr[-2000:].decode(errors="replace"),
    }


def tasks_for(
    files: Iterable[Path], template: list[str], input_dir: Path, out_dir: Path, **options: Any
) -> Iterator[tuple[Path, CommandTask]]:
    for relative in files:
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        argv = command_for(template, input_dir, out_dir, relative)
        yield relative, CommandTask(argv, **options)


class Journal:
    """Append-only JSON Lines, one flushed line per finished file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        # One write() per line: a kill can tear at most the line being written.
        self._file.write(json.dumps(entry, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]
