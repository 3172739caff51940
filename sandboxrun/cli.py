"""The ``sandboxrun`` command line: ``run``, ``batch`` and ``doctor`` (helpers in ``_cli/``).

Exit codes of ``run`` (like ``timeout(1)``, the runner's own verdicts sit above 120):
the command's own status when it ended by itself, 128+N when a signal N killed it,
124 timed out, 123 out of memory, 122 CPU-time limit (the whole tree's), 121 process limit,
125 sandboxrun itself failed, 126 the command cannot be executed, 127 command not found,
2 bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from ._backends import NAMES
from ._cli import journal as journaling
from ._cli.batch import Batch, Interrupted, JournalUnusable, Runner, run_batch
from ._cli.cluster import ClusterUnavailable, DaskBatch
from ._cli.options import (
    batch_isolation,
    cluster_options,
    fail_usage,
    make_manager,
    parse_output_limit,
    set_verbosity,
)
from ._cli.records import record
from ._cli.template import parse_template
from ._cli.verdicts import (
    EXIT_CANNOT_EXECUTE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    RUNNER_VERDICTS,
    command_output,
    exit_code_for,
    verdict,
)
from ._command import CommandTask
from ._doctor import doctor_report, render
from ._limits import DEFAULT_MAX_PROCESSES

__all__ = ["app", "exit_code_for", "main", "verdict"]

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
    str | None,
    typer.Option("--cpu-time", help="CPU-time limit of the whole process tree: 10s, 1m."),
]
CpusOpt = Annotated[
    float | None,
    typer.Option("--cpus", help="CPU quota: at most this many CPUs at once (0.5 = half of one)."),
]
ProcsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-processes",
        # Not given: None reaches the manager, whose default this is (a cluster's workers
        # then apply their own, as they do where no pids controller can take a limit).
        help="Process-count limit (fork bombs), threads included"
        f" (default {DEFAULT_MAX_PROCESSES}; 0: no limit).",
        show_default=False,
    ),
]
BackendOpt = Annotated[str, typer.Option("--backend", help=f"One of: {', '.join(NAMES)}.")]
IsolationOpt = Annotated[
    str | None,
    typer.Option(
        "--isolation",
        help="Task isolation (Linux): default, strict or none (docs/security.md); batch: strict"
        " unless given.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON record instead of text.")]


@app.callback()
def options(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="Log to stderr: -v info, -vv debug.")
    ] = 0,
) -> None:
    """Run untrusted commands under kernel-enforced memory, time and process limits."""
    set_verbosity(verbose)


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    memory: MemoryOpt = None,
    timeout: TimeoutOpt = None,
    cpu_time: CpuOpt = None,
    max_processes: ProcsOpt = None,
    cpus: CpusOpt = None,
    backend: BackendOpt = "auto",
    isolation: IsolationOpt = None,
    stdin: Annotated[Path | None, typer.Option(help="Feed this file (or - for our stdin).")] = None,
    json_output: JsonOpt = False,
    output_limit: Annotated[
        str, typer.Option(help="With --json: stdout/stderr kept, each.")
    ] = "1M",
) -> None:
    """Run one command under the limits and exit with its status.

    Output streams through as it comes (with --json it is captured, capped, and put in the record).
    """
    manager = make_manager(
        1, memory, timeout, cpu_time, max_processes, backend, cpus, isolation=isolation,
        command=list(command),
    )  # fmt: skip
    limit = parse_output_limit(output_limit)
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
        entry = record(Path(command[0]), result)
        output = command_output(result)
        if output is not None:
            entry["stdout"] = output.stdout.decode(errors="replace")
            entry["stderr"] = output.stderr.decode(errors="replace")
            entry["stdout_truncated"] = output.stdout_truncated
            entry["stderr_truncated"] = output.stderr_truncated
        entry["exit_status"] = code
        typer.echo(json.dumps(entry, default=str, indent=1))
    elif code in RUNNER_VERDICTS:
        typer.echo(f"sandboxrun: {verdict(result)}: {result.exception}", err=True)
    elif code in (EXIT_NOT_FOUND, EXIT_CANNOT_EXECUTE):
        typer.echo(f"sandboxrun: {command[0]}: {result.exception}", err=True)
    raise typer.Exit(code)


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
    cpus: CpusOpt = None,
    backend: BackendOpt = "auto",
    isolation: IsolationOpt = None,
    journal: Annotated[
        Path | None,
        typer.Option(help="JSON Lines journal (default: OUT/sandboxrun-journal.jsonl)."),
    ] = None,
    journal_key: Annotated[
        Path | None,
        typer.Option(help="The journal's secret key (default: in ~/.local/state/sandboxrun)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Skip files with a genuine record for the input as it is."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start a new journal over an old one.")
    ] = False,
    follow_symlinks: Annotated[
        bool,
        typer.Option("--follow-symlinks", help="Run symlinked files too (skipped by default)."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Dask scheduler (tcp://HOST:8786): run the tasks on its workers."),
    ] = None,
) -> None:
    """Run the command once per file in INPUT_DIR, with a journal, progress and a summary.

    With --scheduler the tasks run on a Dask cluster (each worker enforces the limits with its
    own backend; INPUT_DIR and OUT must be the same paths on every worker: shared storage).
    Exits 0 when every file succeeded, 1 when some failed, 130 when interrupted (Ctrl-C).
    """
    from rich.console import Console

    if not input_dir.is_dir():
        raise fail_usage(f"{input_dir} is not a directory")
    try:
        template = parse_template(cmd)
    except ValueError as error:
        raise fail_usage(str(error)) from None
    if workers is not None and workers < 1:
        raise fail_usage("--workers must be at least 1")
    profile = batch_isolation(isolation, (input_dir, out))  # strict unless told otherwise
    local = make_manager(
        workers, memory, timeout, cpu_time, max_processes, backend, cpus, profile,
        readable=(str(input_dir.resolve()),), command=template,
    )  # fmt: skip
    unknown_uid = False  # a local manager hands each task its staging folder at launch
    manager: Runner = local
    if scheduler is not None:  # the workers' working folder is not ours: absolute paths
        input_dir, out = input_dir.absolute(), out.absolute()
        limits = cluster_options(local, backend)
        try:
            manager, unknown_uid = DaskBatch(scheduler, workers, limits), True  # theirs: unknown
        except ClusterUnavailable as error:
            raise fail_usage(str(error)) from None
    journal_path = journal or out / "sandboxrun-journal.jsonl"
    if journal_path.exists() and not (resume or overwrite):
        raise fail_usage(f"{journal_path} exists: add --resume to continue it or --overwrite")
    if overwrite and journal_path.exists():
        journal_path.unlink()
    settings = Batch(
        input_dir=input_dir, out_dir=out, template=template, journal_path=journal_path,
        key_path=journal_key or journaling.default_key_path(journal_path), resume=resume,
        follow_symlinks=follow_symlinks, progress=progress, unknown_uid=unknown_uid,
    )  # fmt: skip
    console = Console(stderr=True)
    try:
        every_file_ok = run_batch(settings, manager, console)
    except Interrupted as interrupted:
        console.print(
            f"interrupted: {interrupted.finished} finished files are in the journal; running"
            " tasks were killed. Continue with --resume."
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except JournalUnusable as error:
        raise fail_usage(str(error)) from None
    raise typer.Exit(0 if every_file_ok else 1)


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
    main()
