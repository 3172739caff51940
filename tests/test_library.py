"""The library beyond the seed's contract: command tasks, and the size and duration parsers
(public, and what the CLI's options go through)."""

from __future__ import annotations

import pytest

from sandboxrun import CommandFailed, CommandTask, ProcessManager, parse_duration, parse_size

from .conftest import SCALE


@pytest.mark.parametrize(
    ("text", "value"),
    [("512M", 512 << 20), ("1.5G", 3 << 29), ("4GiB", 4 << 30), ("100kb", 100_000), ("4096", 4096)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [("500ms", 0.5), ("5s", 5), ("2m", 120), ("30", 30)])
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("bad", ["", "12Q", "-5M", "0", "M", "1.2.3G"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["", "5 parsecs", "-1s", "0", "inf"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# --------------------------------------------------------------------- command tasks


def test_command_task_captures_capped_output_and_stdin(backend: str) -> None:
    with ProcessManager(2, backend=backend, worker_timeout_seconds=30 * SCALE) as pm:
        pm.queue_task(CommandTask(["cat"], stdin=b"abc" * 100_000))
        pm.queue_task(CommandTask(["sh", "-c", "yes | head -c 20000000"], output_limit_bytes=1000))
        pm.queue_task(CommandTask(["sh", "-c", "echo oops >&2; exit 3"]))
        pm.queue_task(CommandTask("echo $((6*7))", shell=True))
    by_argv = {}
    for r in pm.task_results:
        assert isinstance(r.task, CommandTask)
        by_argv[str(r.task.argv)] = r
    cat = by_argv["['cat']"].result
    assert cat.stdout == b"abc" * 100_000 and not cat.stdout_truncated
    flood = by_argv[str(["sh", "-c", "yes | head -c 20000000"])].result
    assert len(flood.stdout) == 1000 and flood.stdout_truncated and flood.stdout_bytes == 20_000_000
    failed = by_argv[str(["sh", "-c", "echo oops >&2; exit 3"])]
    assert not failed.success and isinstance(failed.exception, CommandFailed)
    assert failed.exception.result.returncode == 3 and failed.exception.result.stderr == b"oops\n"
    assert by_argv["echo $((6*7))"].result.stdout == b"42\n"


def test_command_task_validation() -> None:
    with pytest.raises(TypeError):
        CommandTask("echo hi")  # a string without shell=True
    with pytest.raises(TypeError):
        CommandTask([])
    with pytest.raises(ValueError):
        CommandTask(["cat"], stdin=b"x", stdin_file="/dev/null")
    with pytest.raises(ValueError):
        CommandTask(["cat"], output_limit_bytes=-1)
