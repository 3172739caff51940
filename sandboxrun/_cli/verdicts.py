"""How the CLI reads a TaskResult: ``run``'s exit code and ``batch``'s verdict.

Both are thin mappings of the one classification, ``sandboxrun._outcome.classify``, which the
library uses too: a limit verdict is decided there and nowhere else.
"""

from __future__ import annotations

from .._command import CommandFailed, CommandResult
from .._outcome import (
    EXIT_CPU_TIME,
    EXIT_OUT_OF_MEMORY,
    EXIT_PROCESSES,
    EXIT_TIMEOUT,
    classify,
)
from .._task import TaskResult

EXIT_INTERNAL = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# The runner's own verdicts: ``run`` explains them on stderr.
RUNNER_VERDICTS = (EXIT_TIMEOUT, EXIT_OUT_OF_MEMORY, EXIT_CPU_TIME, EXIT_PROCESSES, EXIT_INTERNAL)

VERDICTS = ("ok", "failed", "timed out", "out of memory")  # the labels of Verdict, table order
#: batch's own: the command succeeded, but its output was missing or refused (staging.py).
NO_OUTPUT = "no output"


def command_output(result: TaskResult) -> CommandResult | None:
    """The command's status and captured output, whether it succeeded or not."""
    if isinstance(result.result, CommandResult):
        return result.result
    if isinstance(result.exception, CommandFailed):
        return result.exception.result
    return None


def exit_code_for(result: TaskResult) -> int:
    """``sandboxrun run``'s exit status (see the table in docs/cli.md)."""
    limit_code = classify(result).exit_code
    if limit_code is not None:
        return limit_code
    output = command_output(result)
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


def verdict(result: TaskResult) -> str:
    """``sandboxrun batch``'s verdict for one file: one of ``VERDICTS``."""
    return classify(result).label
