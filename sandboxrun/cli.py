"""The ``sandboxrun`` command line: ``run``, ``batch`` and ``doctor``.

Exit codes of ``run`` (like ``timeout(1)``, the runner's own verdicts sit above 120):
the command's own status when it ended by itself, 128+N when a signal N killed it,
124 timed out, 123 out of memory, 122 CPU-time limit, 121 process limit, 125 sandboxrun itself
failed, 126 the command cannot be executed, 127 command not found, 2 bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from . import _batch as batching
from ._backends import NAMES
from ._command import CommandFailed, CommandResult, CommandTask
from ._doctor import doctor_report, render
from ._errors import SandboxrunError
from ._limits import GIB, parse_duration, parse_size
from ._manager import ProcessManager
from ._task import TaskResult

EXIT_TIMEOUT = 124
EXIT_OUT_OF_MEMORY = 123
EXIT_CPU_TIME = 122
EXIT_PROCESSES = 121
EXIT_INTERNAL = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run untrusted commands under kernel-enforced memory, time and process limits.",
)

MemoryOpt = Annotated[
    str | None, typer.Option("--memory", "-m", help="Memory limit: 512M, 1.5G, 4GiB, bytes.")
]
TimeoutOpt = Annotated[
    str | None, typer.Option("--timeout", "-t", help="Wall-clock limit: 500ms, 5s, 2m, seconds.")
]
CpuOpt = Annotated[
    str | None, typer.Option("--cpu-time", help="CPU-time limit (RLIMIT_CPU): 10s, 1m.")
]
ProcsOpt = Annotated[
    int | None, typer.Option("--max-processes", help="Process-count limit (fork bombs).")
]
BackendOpt = Annotated[str, typer.Option("--backend", help=f"One of: {', '.join(NAMES)}.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON record instead of text.")]


def _fail_usage(message: str) -> typer.Exit:
    typer.echo(f"sandboxrun: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _manager(
    workers: int | None,
    memory: str | None,
    timeout: str | None,
    cpu_time: str | None,
    max_processes: int | None,
    backend: str,
) -> ProcessManager:
    """One parser for sizes and durations (the library's); a bad value is a one-line error."""
    try:
        return ProcessManager(
            max_workers=workers,
            worker_timeout_seconds=None if timeout is None else parse_duration(timeout),
            memory_limit_in_gib=None if memory is None else parse_size(memory) / GIB,
            cpu_time_limit_seconds=None if cpu_time is None else parse_duration(cpu_time),
            max_processes=max_processes,
            backend=backend,
        )
    except (ValueError, TypeError, SandboxrunError) as error:
        raise _fail_usage(str(error)) from None


def exit_code_for(result: TaskResult) -> int:
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.out_of_memory:
        return EXIT_OUT_OF_MEMORY
    if result.cpu_time_limit_exceeded:
        return EXIT_CPU_TIME
    if result.process_limit_exceeded:
        return EXIT_PROCESSES
    output = _command_output(result)
    if output is not None:
        code = output.returncode
        return 128 - code if code < 0 else code
    if isinstance(result.exception, FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(result.exception, PermissionError):
        return EXIT_CANNOT_EXECUTE
    if result.exit_code is not None and result.exit_code < 0:
        return 128 - result.exit_code
    return EXIT_INTERNAL


def _command_output(result: TaskResult) -> CommandResult | None:
    if isinstance(result.result, CommandResult):
        return result.result
    if isinstance(result.exception, CommandFailed):
        return result.exception.result
    return None


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    memory: MemoryOpt = None,
    timeout: TimeoutOpt = None,
    cpu_time: CpuOpt = None,
    max_processes: ProcsOpt = None,
    backend: BackendOpt = "auto",
    stdin: Annotated[Path | None, typer.Option(help="Feed this file (or - for our stdin).")] = None,
    json_output: JsonOpt = False,
    output_limit: Annotated[
        str, typer.Option(help="With --json: stdout/stderr kept, each.")
    ] = "1M",
) -> None:
    """Run one command under the limits and exit with its status.

    Output streams through as it comes (with --json it is captured, capped, and put in the record).
    """
    manager = _manager(1, memory, timeout, cpu_time, max_processes, backend)
    try:
        limit = parse_size(output_limit)
    except ValueError as error:
        raise _fail_usage(str(error)) from None
    stdin_file = None
    if stdin is not None:
        stdin_file = f"/proc/{os.getpid()}/fd/0" if str(stdin) == "-" else str(stdin)
    task = CommandTask(
        command, stdin_file=stdin_file, capture_output=json_output, output_limit_bytes=limit
    )
    try:
        with manager:
            manager.queue_task(task)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    result = manager.task_results[0]
    code = exit_code_for(result)
    if json_output:
        entry = batching.record(Path(command[0]), result)
        output = _command_output(result)
        if output is not None:
            entry["stdout"] = output.stdout.decode(errors="replace")
            entry["stderr"] = output.stderr.decode(errors="replace")
            entry["stdout_truncated"] = output.stdout_truncated
            entry["stderr_truncated"] = output.stderr_truncated
        entry["exit_status"] = code
        typer.echo(json.dumps(entry, default=str, indent=1))
    elif code in (EXIT_TIMEOUT, EXIT_OUT_OF_MEMORY, EXIT_CPU_TIME, EXIT_PROCESSES, EXIT_INTERNAL):
        typer.echo(f"sandboxrun: {batching.verdict(result)}: {result.exception}", err=True)
    elif code in (EXIT_NOT_FOUND, EXIT_CANNOT_EXECUTE):
        typer.echo(f"sandboxrun: {command[0]}: {result.exception}", err=True)
    raise typer.Exit(code)


def _summary(results: list[dict[str, Any]], elapsed: float, console: Any) -> None:
    from rich.table import Table

    counts = {name: 0 for name in batching.VERDICTS}
    for entry in results:
        counts[entry["verdict"]] += 1
    peaks = [entry["max_memory_used_in_gib"] * 1024 for entry in results]
    table = Table(title=f"{len(results)} files ({elapsed:.1f} s in this run)")
    for column in (*batching.VERDICTS, "peak MiB p50", "p95", "max"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(counts[name]) for name in batching.VERDICTS),
        *(f"{value:.1f}" if peaks else "-" for value in (
            batching.percentile(peaks, 0.5), batching.percentile(peaks, 0.95), max(peaks, default=0)
        )),
    )  # fmt: skip
    console.print(table)


@app.command()
def batch(
    input_dir: Annotated[Path, typer.Argument(help="Folder of input files (walked recursively).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (mirrors the input tree).")
    ],
    cmd: Annotated[
        str,
        typer.Option("--cmd", help="Command template: {input} {output} {name} {stem} {out_dir}."),
    ],
    workers: Annotated[
        int | None, typer.Option("--workers", "-j", help="Tasks at once (default: usable CPUs).")
    ] = None,
    memory: MemoryOpt = None,
    timeout: TimeoutOpt = None,
    cpu_time: CpuOpt = None,
    max_processes: ProcsOpt = None,
    backend: BackendOpt = "auto",
    journal: Annotated[
        Path | None,
        typer.Option(help="JSON Lines journal (default: OUT/sandboxrun-journal.jsonl)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip files the journal records as done.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start a new journal over an old one.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Run the command once per file in INPUT_DIR, with a journal, progress and a summary.

    Exits 0 when every file succeeded, 1 when some failed, 130 when interrupted (Ctrl-C).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    if not input_dir.is_dir():
        raise _fail_usage(f"{input_dir} is not a directory")
    try:
        template = batching.parse_template(cmd)
    except ValueError as error:
        raise _fail_usage(str(error)) from None
    if workers is not None and workers < 1:
        raise _fail_usage("--workers must be at least 1")
    manager = _manager(workers, memory, timeout, cpu_time, max_processes, backend)
    journal_path = journal or out / "sandboxrun-journal.jsonl"
    if journal_path.exists() and not (resume or overwrite):
        raise _fail_usage(f"{journal_path} exists: add --resume to continue it or --overwrite")
    if overwrite and journal_path.exists():
        journal_path.unlink()
    done = batching.read_journal(journal_path) if resume else {}
    files = [f for f in batching.list_inputs(input_dir) if str(f) not in done]
    console = Console(stderr=True)
    console.print(
        f"{len(files)} files to run, {len(done)} already done; backend {manager.backend.name};"
        f" journal {journal_path}"
    )
    records: list[dict[str, Any]] = []
    log = batching.Journal(journal_path)
    started = time.monotonic()
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} files/s"), TimeRemainingColumn(),
        TextColumn("[red]{task.fields[failures]} failed"),
    )  # fmt: skip
    bar = Progress(*columns, console=console, disable=not progress, transient=False)
    try:
        with bar, manager:
            bar_task = bar.add_task("batch", total=len(files), rate=0.0, failures=0)
            by_task = {}
            for relative, task in batching.tasks_for(files, template, input_dir, out):
                manager.queue_task(task)
                by_task[id(task)] = relative
            failures = 0
            for result in manager.as_completed():
                entry = batching.record(by_task[id(result.task)], result)
                log.write(entry)
                records.append(entry)
                failures += entry["verdict"] != "ok"
                rate = len(records) / max(time.monotonic() - started, 1e-9)
                bar.update(bar_task, advance=1, rate=rate, failures=failures)
    except KeyboardInterrupt:
        log.close()
        console.print(
            f"interrupted: {len(records)} finished files are in the journal; running tasks were"
            " killed. Continue with --resume."
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    log.close()
    # The summary covers the whole batch, earlier runs of a resumed one included.
    everything = list(batching.read_journal(journal_path).values())
    _summary(everything, time.monotonic() - started, console)
    raise typer.Exit(0 if all(entry["verdict"] == "ok" for entry in everything) else 1)


@app.command()
def doctor(json_output: JsonOpt = False) -> None:
    """Which backend auto picks here and why; what the kernel enforces; how to get more."""
    report = doctor_report()
    typer.echo(json.dumps(report, indent=1, default=str) if json_output else render(report))


def main() -> None:  # pragma: no cover - console entry point
    # Ctrl-C must reach our handler as KeyboardInterrupt, even under a parent that ignored it.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
