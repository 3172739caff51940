"""``sandboxrun batch``: one command task per input file, a MAC'd journal, resumable.

    input folder ──> inputs.list_inputs ──> regular files (skipped ones reported)
                     journal.read_journal + stale_reason ──> the ones --resume may skip
    the rest ──> staging.folder_for ──> template.command_for ──> CommandTask ──> ProcessManager
                 (each task writes only its own staging folder: see staging.py)
    as_completed ──> records.record ──> ok? staging.collect: its files moved into OUT, or
                     "no output" with the reason ──> staging.discard (whatever the verdict)
                 ──> + queue-time identity ──> Journal.write (one line, MAC'd)
    the whole journal, verified ──> records.summary ──> exit 0 (all ok) / 1

The journal is the batch's memory: one line per finished file, written the moment its result
arrives, so a batch killed at any point -- even by SIGKILL -- keeps every finished file.
Only the manager writes it; see ``journal.py`` for what a hostile converter can and cannot do.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .._command import CommandTask
from .._task import Task, TaskResult
from . import journal as journaling
from .inputs import Inputs, list_inputs
from .records import record, summary
from .staging import SUPPORTED as STAGING_SUPPORTED
from .staging import Refused, Staging
from .template import command_for, writes_output
from .verdicts import NO_OUTPUT

_SHOWN = 20


@dataclasses.dataclass
class Batch:
    """What the command line asked for (already validated)."""

    input_dir: Path
    out_dir: Path
    template: list[str]
    journal_path: Path
    key_path: Path
    resume: bool
    follow_symlinks: bool
    progress: bool
    # The tasks run under uids the launch cannot hand their staging folders to (a cluster's
    # workers): the folders must be writable by anyone (see staging.py). A local manager's
    # tasks get theirs handed over at launch (0700, the task's own uid).
    unknown_uid: bool = False


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Runner(Protocol):
    """What the batch needs of its manager: a ``ProcessManager``, or ``cluster.DaskBatch``."""

    @property
    def backend(self) -> _Named: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None: ...

    def queue_task(self, task: Task) -> None: ...

    def as_completed(self) -> Iterator[TaskResult]: ...


class JournalUnusable(Exception):
    """The journal or its key cannot be opened (e.g. a symlink where the journal should be)."""


class OutputUnusable(JournalUnusable):
    """The output folder cannot hold the batch's staging folder."""


class Interrupted(Exception):
    """Ctrl-C: the journal is kept; ``finished`` files are in it."""

    def __init__(self, finished: int) -> None:
        super().__init__(finished)
        self.finished = finished


def run_batch(batch: Batch, manager: Runner, console: Any) -> bool:
    """Run every file not yet done; True when every file of the whole journal is ``ok``."""
    inputs = list_inputs(batch.input_dir, follow_symlinks=batch.follow_symlinks)
    _report_skipped(inputs, console)
    try:
        key = _key(batch)
        writer = journaling.Journal(batch.journal_path, key)
    except OSError as error:
        raise JournalUnusable(f"cannot use the journal {batch.journal_path}: {error}") from None
    done = _trusted(batch, key, inputs, console) if batch.resume else set()
    files = [relative for relative in inputs.files if str(relative) not in done]
    console.print(
        f"{len(files)} files to run, {len(done)} already done; backend {manager.backend.name};"
        f" journal {batch.journal_path}"
    )
    started = time.monotonic()
    _run(batch, manager, files, writer, console)
    # The summary covers the whole batch, earlier runs of a resumed one included.
    contents = journaling.read_journal(batch.journal_path, key, warn=False)  # warned above
    everything = list(contents.records.values())
    summary(everything, time.monotonic() - started, console)
    return all(entry["verdict"] == "ok" for entry in everything)


def _key(batch: Batch) -> bytes:
    """The journal's key: the existing one to resume, else a fresh one for a new journal."""
    if batch.resume and batch.journal_path.exists():
        key = journaling.load_key(batch.key_path)  # None: it warned that every file reruns
        if key is not None:
            return key
    return journaling.new_key(batch.key_path)


def _trusted(batch: Batch, key: bytes, inputs: Inputs, console: Any) -> set[str]:
    """The files --resume skips: a record with a valid MAC for the input as it is now."""
    contents = journaling.read_journal(batch.journal_path, key)
    if contents.rejected:
        console.print(
            f"{contents.rejected} journal lines ignored (torn, forged or from another key):"
            " their files run again"
        )
    trusted, stale = set(), 0
    for relative in inputs.files:
        entry = contents.records.get(str(relative))
        if entry is None:
            continue
        reason = journaling.stale_reason(entry, batch.input_dir / relative, batch.follow_symlinks)
        if reason is None:
            trusted.add(str(relative))
            continue
        stale += 1
        journaling.log.info("%s %s: it runs again", relative, reason)
        if stale <= _SHOWN:
            console.print(f"{relative}: {reason}: it runs again")
    if stale > _SHOWN:
        console.print(f"... {stale} files in all changed since their record: they run again")
    return trusted


def _report_skipped(inputs: Inputs, console: Any) -> None:
    for skipped in inputs.skipped[:_SHOWN]:
        journaling.log.info("skipped %s: %s", skipped.relative, skipped.reason)
        console.print(f"skipped {skipped.relative}: {skipped.reason}")
    if len(inputs.skipped) > _SHOWN:
        console.print(f"... {len(inputs.skipped)} entries skipped in all")


def tasks_for(
    files: Iterable[Path], template: list[str], input_dir: Path, staging: Staging | Path
) -> Iterator[tuple[Path, Path, CommandTask]]:
    """Each file's staging folder and task: ``{output}`` and ``{out_dir}`` point into that
    folder, the only path the task may write (under strict). Given OUT instead (Windows: no
    staging), the command writes there in place."""
    for relative in files:
        if isinstance(staging, Path):
            folder = staging
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        else:
            folder = staging.folder_for(relative)
        argv = command_for(template, input_dir, folder, relative)
        task = CommandTask(argv, read_write_paths=(str(folder.absolute()),))
        if isinstance(staging, Staging):  # the folder becomes the task's uid's at its launch
            task._launch_hook = staging.launch_hook(folder)
        yield relative, folder, task


def _deliver(entry: dict[str, Any], folder: Path, staging: Staging, expected: bool) -> None:
    """An ok task's files into OUT (``entry["output"]``); none, or one refused, makes the
    verdict "no output" with the reason in ``entry["output_problem"]``."""
    entry["output"], entry["output_problem"] = [], None
    if entry["verdict"] != "ok":
        return  # a failed task's partial files are never moved: discarded with its folder
    try:
        entry["output"] = staging.collect(folder)
    except (Refused, OSError) as error:
        entry["output_problem"] = f"output refused: {error}; nothing was moved into --out"
    else:
        if expected and not entry["output"]:
            entry["output_problem"] = "the command succeeded but wrote no output file"
    if entry["output_problem"] is not None:
        entry["verdict"] = NO_OUTPUT
        journaling.log.info("%s: %s", entry["file"], entry["output_problem"])  # in the summary


def _run(
    batch: Batch,
    manager: Runner,
    files: list[Path],
    writer: journaling.Journal,
    console: Any,
) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} files/s"), TimeRemainingColumn(),
        TextColumn("[red]{task.fields[failures]} failed"),
    )  # fmt: skip
    bar = Progress(*columns, console=console, disable=not batch.progress, transient=False)
    staging: Staging | Path = batch.out_dir
    try:
        if STAGING_SUPPORTED:
            protected = (batch.journal_path, batch.key_path)
            staging = Staging(batch.out_dir, protected, batch.unknown_uid)
    except OSError as error:
        raise OutputUnusable(f"cannot stage outputs in {batch.out_dir}: {error}") from None
    try:
        _convert(batch, manager, files, writer, staging, bar)
    except KeyboardInterrupt:
        raise Interrupted(int(bar.tasks[0].completed) if bar.tasks else 0) from None
    finally:
        if isinstance(staging, Staging):
            staging.close()  # after the manager's exit: every task is dead by now


def _convert(
    batch: Batch,
    manager: Runner,
    files: list[Path],
    writer: journaling.Journal,
    staging: Staging | Path,
    bar: Any,
) -> None:
    finished = failures = 0
    started = time.monotonic()
    expected = writes_output(batch.template)
    with bar, manager:
        bar_task = bar.add_task("batch", total=len(files), rate=0.0, failures=0)
        queued: dict[int, tuple[Path, Path, dict[str, int] | None]] = {}
        for relative, folder, task in tasks_for(files, batch.template, batch.input_dir, staging):
            source = batch.input_dir / relative
            identity = journaling.queued_identity(source, batch.follow_symlinks)
            queued[id(task)] = relative, folder, identity
            manager.queue_task(task)
        for result in manager.as_completed():
            relative, folder, identity = queued[id(result.task)]
            entry = record(relative, result)
            if isinstance(staging, Staging):
                try:
                    _deliver(entry, folder, staging, expected)
                finally:
                    staging.discard(folder)
            entry["input"] = identity
            writer.write(entry)
            finished += 1
            failures += entry["verdict"] != "ok"
            rate = finished / max(time.monotonic() - started, 1e-9)
            bar.update(bar_task, advance=1, rate=rate, failures=failures)
