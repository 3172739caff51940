"""The CLI via typer's runner and as real processes: exit codes, JSON, journal, resume, Ctrl-C.

The library parts it is built on (command tasks, size and duration parsing) are tested in
test_library.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from sandboxrun.cli import app

from .conftest import SCALE, leftover_cgroups, wait_until

runner = CliRunner()
PY = sys.executable
CLI = [PY, "-m", "sandboxrun"]


# --------------------------------------------------------------------- sandboxrun run


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def test_run_exits_with_the_command_status() -> None:
    assert invoke("run", "--", "true").exit_code == 0
    assert invoke("run", "--", "sh", "-c", "exit 7").exit_code == 7


def test_run_timeout_is_124() -> None:
    result = invoke("run", "--timeout", f"{0.5 * SCALE}s", "--", "sleep", "30")
    assert result.exit_code == 124


def test_run_out_of_memory_is_123(backend: str) -> None:
    result = invoke(
        "run", "--backend", backend, "-m", "64M", "--", PY, "-c", "x = b'a' * (400 << 20)"
    )
    assert result.exit_code == 123


def test_run_not_found_is_127_and_bad_values_are_2() -> None:
    assert invoke("run", "--", "no-such-program-xyz").exit_code == 127
    bad = invoke("run", "-m", "12Q", "--", "true")
    assert bad.exit_code == 2
    assert "not a size" in bad.output
    assert invoke("run", "--timeout", "soon", "--", "true").exit_code == 2
    assert invoke("run", "--backend", "nope", "--", "true").exit_code == 2


def test_run_json_record() -> None:
    result = invoke("run", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    record = json.loads(result.stdout)
    assert record["verdict"] == "failed" and record["returncode"] == 3
    assert record["stdout"] == "out\n" and record["stderr"] == "err\n"
    assert record["exit_status"] == 3 and record["timed_out"] is False
    assert set(record) >= {"max_memory_used_in_gib", "elapsed_time", "backend", "out_of_memory"}


def test_run_as_a_real_process_streams_output() -> None:
    done = subprocess.run(
        [*CLI, "run", "--", "sh", "-c", "echo streamed; exit 5"], capture_output=True, timeout=60
    )
    assert done.returncode == 5 and done.stdout == b"streamed\n"
    timed = subprocess.run([*CLI, "run", "-t", "300ms", "--json", "--", "sleep", "30"],
                           capture_output=True, timeout=60 * SCALE)  # fmt: skip
    assert timed.returncode == 124
    assert json.loads(timed.stdout)["verdict"] == "timed out"


def test_doctor() -> None:
    result = invoke("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["chosen"] in report["backends"]
    assert {"kernel", "cgroup_layout", "kernel_enforced", "polled", "fixes"} <= set(report)
    text = invoke("doctor")
    assert f"backend (auto): {report['chosen']}" in text.stdout


# --------------------------------------------------------------------- sandboxrun batch

CONVERTER = """
import sys, time, pathlib, signal
src, dst = sys.argv[1], sys.argv[2]
data = pathlib.Path(src).read_bytes()
if data.startswith(b"SLOW"):
    time.sleep(float(data.split()[1]))
if data.startswith(b"HANG"):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the manager can end it, not a Ctrl-C
    time.sleep(3600)
if data.startswith(b"BOMB"):
    x = b"a" * (600 << 20)
if data.startswith(b"FAIL"):
    sys.exit(4)
pathlib.Path(dst).write_bytes(data.upper())
"""


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "conv.py").write_text(CONVERTER)
    return tmp_path


def batch_args(base: Path, *extra: str) -> list[str]:
    return [
        "batch", str(base / "in"), "--out", str(base / "out"), "--no-progress",
        "--cmd", f"{PY} {base / 'conv.py'} {{input}} {{output}}", *extra,
    ]  # fmt: skip


def journal(base: Path) -> list[dict[str, Any]]:
    path = base / "out" / "sandboxrun-journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_classifies_every_file(batch_dir: Path) -> None:
    files = {"a.txt": b"hello", "sub/b;rm -rf x.txt": b"world", "hang.txt": b"HANG",
             "bomb.txt": b"BOMB", "fail.txt": b"FAIL"}  # fmt: skip
    for name, data in files.items():
        (batch_dir / "in" / name).write_bytes(data)
    result = runner.invoke(
        app, batch_args(batch_dir, "-j", "2", "-t", f"{2 * SCALE}s", "-m", "256M")
    )
    assert result.exit_code == 1, result.output
    verdicts = {entry["file"]: entry["verdict"] for entry in journal(batch_dir)}
    assert verdicts == {"a.txt": "ok", "sub/b;rm -rf x.txt": "ok", "hang.txt": "timed out",
                        "bomb.txt": "out of memory", "fail.txt": "failed"}  # fmt: skip
    assert (batch_dir / "out" / "sub" / "b;rm -rf x.txt").read_bytes() == b"WORLD"
    fail = next(e for e in journal(batch_dir) if e["file"] == "fail.txt")
    assert fail["returncode"] == 4
    assert "ok" in result.output and "out of memory" in result.output  # the summary table
    assert not leftover_cgroups()


def test_batch_refuses_to_clobber_a_journal_and_resumes(batch_dir: Path) -> None:
    for index in range(3):
        (batch_dir / "in" / f"{index}.txt").write_bytes(b"x")
    assert runner.invoke(app, batch_args(batch_dir)).exit_code == 0
    again = runner.invoke(app, batch_args(batch_dir))
    assert again.exit_code == 2 and "--resume" in again.output
    (batch_dir / "in" / "new.txt").write_bytes(b"y")
    resumed = runner.invoke(app, batch_args(batch_dir, "--resume"))
    assert resumed.exit_code == 0
    assert [entry["file"] for entry in journal(batch_dir)][-1] == "new.txt"
    assert len(journal(batch_dir)) == 4


def test_batch_bad_template_is_a_usage_error(batch_dir: Path) -> None:
    (batch_dir / "in" / "a.txt").write_bytes(b"x")
    result = runner.invoke(app, [*batch_args(batch_dir)[:-2], "--cmd", "tool {inptu}"])
    assert result.exit_code == 2 and "unknown placeholder" in result.output


def _wait_for_lines(path: Path, count: int, seconds: float) -> None:
    """Wait until the journal has ``count`` lines (``seconds`` times SCALE at the most)."""
    def reached() -> bool:
        return path.exists() and len(path.read_text().splitlines()) >= count

    if not wait_until(reached, seconds, interval=0.02):
        raise AssertionError(f"journal never reached {count} lines")


def _converters(batch_dir: Path, pattern: str = "") -> list[int]:
    """Pids of this test's converter processes (``conv.py`` and then ``pattern`` in their
    command line; the CLI's own ``--cmd`` argument names ``conv.py {input}``)."""
    found = subprocess.run(
        ["pgrep", "-f", f"{batch_dir / 'conv.py'} .*{pattern}"], capture_output=True
    )
    return [int(pid) for pid in found.stdout.split()]


def test_batch_survives_sigkill_and_resume_redoes_nothing(batch_dir: Path) -> None:
    for index in range(8):
        (batch_dir / "in" / f"{index}.txt").write_bytes(b"SLOW %f" % (0.3 * SCALE))
    args = batch_args(batch_dir, "-j", "1")
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = batch_dir / "out" / "sandboxrun-journal.jsonl"
    _wait_for_lines(path, 3, 60)
    process.kill()
    process.wait(timeout=30)
    first = [entry["file"] for entry in journal(batch_dir)]
    assert 3 <= len(first) < 8
    finished = subprocess.run([*CLI, *args, "--resume"], capture_output=True, timeout=120 * SCALE)
    assert finished.returncode == 0, finished.stderr.decode()
    files = [entry["file"] for entry in journal(batch_dir)]
    assert sorted(files) == sorted(f"{index}.txt" for index in range(8))  # each exactly once
    assert files[: len(first)] == first


def test_batch_ctrl_c_kills_tasks_and_keeps_the_journal(batch_dir: Path) -> None:
    # Two quick files for the journal, then converters that never end by themselves and ignore
    # the Ctrl-C: one left behind stays, so the check below cannot pass by a lucky exit.
    for index in range(2):
        (batch_dir / "in" / f"{index}.txt").write_bytes(b"x")
    for index in range(2, 6):
        (batch_dir / "in" / f"{index}-hang.txt").write_bytes(b"HANG")
    process = subprocess.Popen(
        [*CLI, *batch_args(batch_dir, "-j", "2")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    path = batch_dir / "out" / "sandboxrun-journal.jsonl"
    _wait_for_lines(path, 2, 60)
    assert wait_until(lambda: _converters(batch_dir, "-hang"), 30), "no hanging task started"
    os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    _, err = process.communicate(timeout=30 * SCALE)
    assert process.returncode == 130, err.decode()
    assert b"--resume" in err
    assert len(journal(batch_dir)) >= 2
    # A task SIGKILLed just before the CLI exited may take a moment to leave the process table.
    wait_until(lambda: not _converters(batch_dir), 10)
    assert _converters(batch_dir) == []
    assert not (batch_dir / "out" / ".sandboxrun-staging").exists()  # removed at the Ctrl-C
