"""A TaskResult as one JSON record (the journal's line, ``run --json``), and the batch summary."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from .._task import TaskResult
from .verdicts import NO_OUTPUT, VERDICTS, command_output, verdict


def record(relative: Path, result: TaskResult) -> dict[str, Any]:
    """Every TaskResult field that makes sense in JSON, plus the command's status and stderr."""
    fields = {
        field.name: getattr(result, field.name)
        for field in dataclasses.fields(result)
        if field.name not in ("task", "result", "exception")
    }
    output = command_output(result)
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


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def summary(results: list[dict[str, Any]], elapsed: float, console: Any) -> None:
    """Verdict counts and peak-memory percentiles, as a table on ``console``."""
    from rich.table import Table

    counts = dict.fromkeys((*VERDICTS, NO_OUTPUT), 0)
    for entry in results:
        counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
    columns = (*VERDICTS, NO_OUTPUT) if counts[NO_OUTPUT] else VERDICTS  # shown when it happened
    measured = (entry.get("max_memory_used_in_gib") for entry in results)
    peaks = [gib * 1024 for gib in measured if isinstance(gib, (int, float))]  # None: unknown
    table = Table(title=f"{len(results)} files ({elapsed:.1f} s in this run)")
    for column in (*columns, "peak MiB p50", "p95", "max"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(counts[name]) for name in columns),
        *(f"{value:.1f}" if peaks else "-" for value in (
            percentile(peaks, 0.5), percentile(peaks, 0.95), max(peaks, default=0)
        )),
    )  # fmt: skip
    console.print(table)
    refused = [entry for entry in results if entry.get("output_problem")]
    for entry in refused[:20]:
        console.print(f"{entry['file']}: {entry['output_problem']}")
    if len(refused) > 20:
        console.print(f"... {len(refused)} files in all without an output (see the journal)")
