"""``sandboxrun batch`` against a hostile converter and hostile input names (issue 10, 7-9).

The converter runs with our uid: it can append to the journal, and the input folder's names and
entries are chosen by the attacker. Each test here failed on the code before the MAC'd journal,
the input policy and the template checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandboxrun.cli import app

from .conftest import SCALE

runner = CliRunner()
PY = sys.executable
CLI = [PY, "-m", "sandboxrun"]

# Converts by upper-casing; "FORGE" files forge records for b.txt and c.txt first, then hang.
CONVERTER = """
import json, os, pathlib, sys, time
src, dst = sys.argv[1], sys.argv[2]
data = pathlib.Path(src).read_bytes()
if data.startswith(b"FORGE"):
    # It knows where the journal is: --out, above its own staging folder.
    out = next(p.parent for p in pathlib.Path(dst).parents if p.name == ".sandboxrun-staging")
    journal = out / "sandboxrun-journal.jsonl"
    with open(journal, "a") as out:
        for name in ("b.txt", "c.txt"):
            size = os.stat(pathlib.Path(src).parent / name)
            out.write(json.dumps({"file": name, "verdict": "ok", "success": True,
                                  "input": {"size": size.st_size, "mtime_ns": size.st_mtime_ns},
                                  "mac": "0" * 64}) + "\\n")
    time.sleep(3600)
pathlib.Path(dst).write_bytes(data.upper())
"""

# Writes its argv and the targets of its own and its parent's (the worker's) fds to {output}.
ARGV_DUMPER = """
import json, os, sys
def fds(pid):
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return found
# The parent's pid as /proc numbers it: os.getppid() answers in the task's own PID namespace.
parent = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[1]
dump = {"argv": sys.argv[1:], "fds": fds("self"), "parent_fds": fds(parent)}
open(sys.argv[-1], "w").write(json.dumps(dump))
"""


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Journal keys go to the test's own folder, not ~/.local/state."""
    monkeypatch.setenv("SANDBOXRUN_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def base(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "conv.py").write_text(CONVERTER)
    (tmp_path / "dump.py").write_text(ARGV_DUMPER)
    return tmp_path


def batch_args(base: Path, *extra: str, script: str = "conv.py", inputs: str = "") -> list[str]:
    return [
        "batch", inputs or str(base / "in"), "--out", str(base / "out"), "--no-progress",
        "--cmd", f"{PY} {base / script} {{input}} {{output}}", *extra,
    ]  # fmt: skip


def journal_lines(base: Path) -> list[dict]:
    text = (base / "out" / "sandboxrun-journal.jsonl").read_text()
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def _until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --------------------------------------------------------------------- the journal


def test_forged_ok_records_are_ignored_and_those_files_redone(base):
    (base / "in" / "a.txt").write_bytes(b"FORGE")
    (base / "in" / "b.txt").write_bytes(b"bee")
    (base / "in" / "c.txt").write_bytes(b"sea")
    args = batch_args(base, "-j", "1")
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = base / "out" / "sandboxrun-journal.jsonl"
    try:
        # The two forged lines, while a.txt hangs.
        _until(lambda: path.exists() and path.read_text().count("\n") >= 2, 60 * SCALE, "forgery")
    finally:
        process.kill()  # the batch dies mid-run, as in the report; its workers die with it
        process.wait(timeout=30)
    assert {entry["file"] for entry in journal_lines(base)} == {"b.txt", "c.txt"}
    (base / "in" / "a.txt").write_bytes(b"ay")
    resumed = subprocess.run([*CLI, *args, "--resume"], capture_output=True, timeout=120 * SCALE)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert b"2 journal lines ignored" in resumed.stderr
    assert (base / "out" / "b.txt").read_bytes() == b"BEE"
    assert (base / "out" / "c.txt").read_bytes() == b"SEA"
    assert (base / "out" / "a.txt").read_bytes() == b"AY"


def test_a_torn_last_line_does_not_swallow_the_next_record(base):
    for name in ("a.txt", "b.txt"):
        (base / "in" / name).write_bytes(b"x")
    assert runner.invoke(app, batch_args(base)).exit_code == 0
    path = base / "out" / "sandboxrun-journal.jsonl"
    with path.open("a") as journal:
        journal.write('{"file": "zzz.txt", "verd')  # a crash mid-append
    (base / "in" / "new.txt").write_bytes(b"y")
    resumed = runner.invoke(app, batch_args(base, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "1 files to run, 2 already done" in resumed.output
    assert {entry["file"] for entry in journal_lines(base)} == {"a.txt", "b.txt", "new.txt"}
    again = runner.invoke(app, batch_args(base, "--resume"))
    assert again.exit_code == 0 and "0 files to run, 3 already done" in again.output


def test_without_its_key_no_record_is_trusted(base, tmp_path):
    for name in ("a.txt", "b.txt"):
        (base / "in" / name).write_bytes(b"x")
    assert runner.invoke(app, batch_args(base)).exit_code == 0
    shutil.rmtree(tmp_path / "state")  # the key is gone: the journal could be anybody's
    (base / "out" / "a.txt").unlink()
    resumed = runner.invoke(app, batch_args(base, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "2 files to run, 0 already done" in resumed.output
    assert (base / "out" / "a.txt").read_bytes() == b"X"


def test_a_journal_replaced_by_a_symlink_is_not_written_through(base, tmp_path):
    (base / "in" / "a.txt").write_bytes(b"x")
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (base / "out").mkdir()
    (base / "out" / "sandboxrun-journal.jsonl").symlink_to(target)
    result = runner.invoke(app, batch_args(base, "--resume"))
    assert result.exit_code == 2, result.output
    assert "cannot use the journal" in result.output
    assert target.read_text() == "keep me\n"


def test_huge_and_deeply_nested_foreign_lines_are_skipped(base):
    (base / "in" / "a.txt").write_bytes(b"x")
    assert runner.invoke(app, batch_args(base)).exit_code == 0
    with (base / "out" / "sandboxrun-journal.jsonl").open("a") as journal:
        journal.write("[" * 200_000 + "]" * 200_000 + "\n")  # RecursionError in json.loads
        journal.write('{"file": "b.txt", "x": "' + "y" * (3 << 20) + '"}\n')  # 3 MiB
    (base / "in" / "b.txt").write_bytes(b"b")
    resumed = runner.invoke(app, batch_args(base, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "1 files to run, 1 already done" in resumed.output
    assert "2 journal lines ignored" in resumed.output
    assert (base / "out" / "b.txt").read_bytes() == b"B"


def test_records_are_bound_to_their_input_and_stale_ones_redone(base):
    (base / "in" / "same-size.txt").write_bytes(b"old")
    (base / "in" / "grown.txt").write_bytes(b"old")
    (base / "in" / "kept.txt").write_bytes(b"old")
    assert runner.invoke(app, batch_args(base)).exit_code == 0
    # Same size and the same mtime to the nanosecond: only the ctime (or a hash) can tell.
    same = base / "in" / "same-size.txt"
    before = same.stat()
    same.write_bytes(b"new")
    os.utime(same, ns=(before.st_atime_ns, before.st_mtime_ns))
    (base / "in" / "grown.txt").write_bytes(b"newer")
    resumed = runner.invoke(app, batch_args(base, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "2 files to run, 1 already done" in resumed.output
    assert (base / "out" / "same-size.txt").read_bytes() == b"NEW"
    assert (base / "out" / "grown.txt").read_bytes() == b"NEWER"


def test_each_record_carries_its_input_identity_and_a_mac(base):
    (base / "in" / "kept.txt").write_bytes(b"old")
    assert runner.invoke(app, batch_args(base)).exit_code == 0
    (entry,) = journal_lines(base)
    kept = (base / "in" / "kept.txt").stat()
    assert entry["input"] == {"size": 3, "mtime_ns": kept.st_mtime_ns,
                              "ctime_ns": kept.st_ctime_ns, "ino": kept.st_ino}  # fmt: skip
    assert len(entry["mac"]) == 64 and int(entry["mac"], 16) >= 0


def test_the_journal_fd_reaches_neither_the_command_nor_its_worker(base):
    (base / "in" / "a.txt").write_bytes(b"x")
    assert runner.invoke(app, batch_args(base, script="dump.py")).exit_code == 0
    dump = json.loads((base / "out" / "a.txt").read_text())
    for seen in (dump["fds"], dump["parent_fds"]):  # the command's and its worker's
        assert seen, "the dumper saw no fds at all"
        assert not any("sandboxrun-journal" in target for target in seen.values()), seen


# --------------------------------------------------------------------- input names and entries


def test_option_like_names_reach_the_command_as_paths(base, monkeypatch):
    for name in ("--help", "-n", "plain"):
        (base / "in" / name).write_bytes(b"x")
    monkeypatch.chdir(base / "in")
    result = runner.invoke(app, batch_args(base, script="dump.py", inputs="."))
    assert result.exit_code == 0, result.output
    names = ("--help", "-n")
    argv = {name: json.loads((base / "out" / name).read_text())["argv"] for name in names}
    assert argv["--help"][0] == "./--help"
    assert argv["-n"][0] == "./-n"
    assert json.loads((base / "out" / "plain").read_text())["argv"][0] == "plain"


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_a_file_name_cannot_give_tar_an_option(base, monkeypatch):
    hostile = "--use-compress-program=touch INJ"
    (base / "in" / hostile).write_bytes(b"x")
    (base / "in" / "plain").write_bytes(b"y")  # a real member: tar then runs the "compressor"
    monkeypatch.chdir(base / "in")
    args = ["batch", ".", "--out", str(base / "out"), "--no-progress",
            "--cmd", "tar -cf {output}.tar {input} plain"]  # fmt: skip
    result = runner.invoke(app, args)
    assert not (base / "in" / "INJ").exists() and not (base / "INJ").exists()
    assert result.exit_code == 0, result.output
    listing = subprocess.run(
        ["tar", "-tf", str(base / "out" / f"{hostile}.tar")], capture_output=True, timeout=30
    )
    assert listing.stdout.decode().split("\n")[:2] == [f"./{hostile}", "plain"]


def test_symlinks_are_skipped_unless_asked(base, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    (base / "in" / "link.txt").symlink_to(secret)
    (base / "in" / "hostname").symlink_to("/etc/hostname")
    (base / "in" / "real.txt").write_bytes(b"inside")
    result = runner.invoke(app, batch_args(base))
    assert result.exit_code == 0, result.output
    assert "skipped link.txt: symlink" in result.output
    assert "skipped hostname: symlink" in result.output
    assert not (base / "out" / "link.txt").exists()
    assert not (base / "out" / "hostname").exists()
    assert (base / "out" / "real.txt").read_bytes() == b"INSIDE"
    followed = runner.invoke(app, batch_args(base, "--overwrite", "--follow-symlinks"))
    assert followed.exit_code == 0, followed.output
    assert (base / "out" / "link.txt").read_bytes() == b"OUTSIDE"


def test_a_fifo_is_skipped_and_does_not_hang(base):
    os.mkfifo(base / "in" / "pipe")
    (base / "in" / "real.txt").write_bytes(b"x")
    result = runner.invoke(app, batch_args(base, "-t", f"{10 * SCALE}s"))
    assert result.exit_code == 0, result.output
    assert "skipped pipe: FIFO" in result.output
    assert [entry["file"] for entry in journal_lines(base)] == ["real.txt"]


def test_verbose_logs_to_stderr(base):
    (base / "in" / "link.txt").symlink_to("/etc/hostname")
    result = runner.invoke(app, ["-v", *batch_args(base)])
    assert result.exit_code == 0, result.output
    assert "sandboxrun.cli INFO: skipped link.txt" in result.output


# --------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "template",
    ["{input:>99999999999}", "{input!r}", "{input.__class__}", "{input[0]}", "x{output:10}"],
)
def test_placeholders_take_no_format_spec(base, template):
    (base / "in" / "a.txt").write_bytes(b"x")
    args = [*batch_args(base)[:-2], "--cmd", f"cat {template}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "placeholders take no format spec" in result.output
    assert not (base / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "maximum"),
    [("--timeout", "800h", "maximum is 2147483s"), ("--cpu-time", "800h", "maximum is 2147483s"),
     ("--max-processes", "99999999", "maximum is 4194304"), ("--memory", "1e30G", "maximum is"),
     ("--memory", "1e400G", "")],
)  # fmt: skip
def test_limits_out_of_range_are_usage_errors(base, option, value, maximum):
    (base / "in" / "a.txt").write_bytes(b"x")
    for args in (batch_args(base, option, value), ["run", option, value, "--", "true"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert "Traceback" not in result.output and maximum in result.output
    assert not (base / "out").exists()
