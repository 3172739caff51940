"""``sandboxrun batch`` stages each output privately and moves it into --out only on success
(issue 12): a hostile converter under the batch's default isolation (strict) plants nothing.

Each converter below is one attack of a file that took the converter over; each must miss its
aim, every file must get its correct record, and the good files must be there, byte for byte.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sandboxrun._cli import journal as journaling
from sandboxrun._isolation import STRICT, unavailable_reason
from sandboxrun._isolation.profile import DEFAULT_UID_BASE
from sandboxrun._launch import ZYGOTE_AVAILABLE
from sandboxrun.cli import app

from .conftest import AVAILABLE, KERNEL_BACKENDS, SCALE

runner = CliRunner()
PY = sys.executable

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or unavailable_reason(STRICT) is not None,
    reason="the batch's strict default needs Linux namespaces that work here",
)

# argv: input, output, the real --out, the journal's key, a host file. The input's first word
# says what the file makes the converter do.
CONVERTER = r"""
import os, pathlib, signal, sys, time
src, dst, out, key, host = sys.argv[1:6]
data = pathlib.Path(src).read_bytes()
word = data.split()[0]
def attempt(action):
    try:
        action()
        return "done"
    except OSError as error:
        return f"refused ({error.strerror})"
def write(path, text, mode="w"):
    with open(path, mode) as file:
        file.write(text)
notes = []
if word in (b"FAIL", b"KILL", b"HANG"):
    write(dst, "partial")  # a partial output, then the converter dies one way or another
    if word == b"FAIL":
        sys.exit(3)
    if word == b"KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)
if word == b"OVERWRITE":  # another file of --out, and a new one planted there
    notes.append(attempt(lambda: write(os.path.join(out, "precious.txt"), "OWNED")))
    notes.append(attempt(lambda: write(os.path.join(out, "planted.txt"), "OWNED")))
if word == b"JOURNAL":  # a forged line, a new key, and the key read out into our output
    journal = os.path.join(out, "sandboxrun-journal.jsonl")
    notes.append(attempt(lambda: write(journal, '{"file": "x", "verdict": "ok"}\n', "a")))
    notes.append(attempt(lambda: write(key, "00" * 32)))
    for folder in (out, os.path.dirname(os.path.dirname(key))):  # what stops it: the mount
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        notes.append(f"{'read-only' if read_only else 'WRITABLE'} mount")
    try:
        notes.append("key " + pathlib.Path(key).read_text())
    except OSError as error:
        notes.append(f"key unreadable ({error.strerror})")
if word == b"SYMLINK":
    os.symlink(host, dst)
    sys.exit(0)
if word == b"HARDLINK":  # a host file if the kernel allows it, else a second name of our own
    if attempt(lambda: os.link(host, dst)) != "done":
        write(dst, "mine")
        os.link(dst, dst + ".2")
    sys.exit(0)
if word == b"FIFO":
    os.mkfifo(dst)
    sys.exit(0)
if word == b"NEIGHBOUR":  # the next file's staging folder (the test makes the names known)
    mine = pathlib.Path(dst).parent
    target = mine.parent / f"t{int(mine.name[1:]) + 1}"
    notes.append(attempt(lambda: write(target / "z-victim.txt", "PLANTED ")))
    notes.append(attempt(lambda: write(target / "extra.txt", "PLANTED")))
    notes.append(attempt(lambda: os.listdir(mine.parent)))
if word == b"SLOWAPPEND":  # the victim: appends, so anything planted before would show
    time.sleep(1.5)
    write(dst, data.upper().decode(), "a")
    sys.exit(0)
if word == b"SETUID":
    write(dst, data.upper().decode())
    try:  # the profile's filter refuses set-id modes; an attacker goes on all the same
        os.chmod(dst, 0o6777)
    except OSError:
        pass
    sys.exit(0)
write(dst, data.upper().decode() + "".join(f"\n{note}" for note in notes))
"""

FILES = {
    "good.txt": b"GOOD hello",
    "sub/deep.txt": b"GOOD deep",
    "fail.txt": b"FAIL",
    "kill.txt": b"KILL",
    "hang.txt": b"HANG",
    "overwrite.txt": b"OVERWRITE",
    "journal.txt": b"JOURNAL",
    "symlink.txt": b"SYMLINK",
    "hardlink.txt": b"HARDLINK",
    "fifo.txt": b"FIFO",
    "y-neighbour.txt": b"NEIGHBOUR",
    "z-victim.txt": b"SLOWAPPEND victim",
    "setuid.txt": b"SETUID x",
}
EXPECTED = {
    "good.txt": "ok", "sub/deep.txt": "ok", "fail.txt": "failed", "kill.txt": "failed",
    "hang.txt": "timed out", "overwrite.txt": "ok", "journal.txt": "ok",
    "symlink.txt": "no output", "hardlink.txt": "no output", "fifo.txt": "no output",
    "y-neighbour.txt": "ok", "z-victim.txt": "ok", "setuid.txt": "ok",
}  # fmt: skip


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A batch folder the tasks' uid can reach (pytest makes its folders 0700), run under the
    batch's own default isolation (the suite's conftest sets none for every manager)."""
    monkeypatch.delenv("SANDBOXRUN_ISOLATION", raising=False)
    for folder in (tmp_path.parent, tmp_path):
        folder.chmod(0o755)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "conv.py").write_text(CONVERTER)
    return tmp_path


def _predictable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Staging names t0 (the run), t1, t2... (the files, in order): the neighbour attack can
    then aim at the next file's folder without having to list it."""
    try:
        from sandboxrun._cli import staging
    except ImportError:  # the code before staging: the attack aims at nothing
        return
    counter = itertools.count()

    class Names:
        @staticmethod
        def token_hex(_: int) -> str:
            return f"t{next(counter)}"

    monkeypatch.setattr(staging, "secrets", Names)


#: The strict profile is given by the zygote only (the portable pass runs spawn).
NEEDS_ZYGOTE = pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="isolation needs the zygote")


def _journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "backend", [*KERNEL_BACKENDS[:1], *(["psutil"] if "psutil" in AVAILABLE else [])]
)
@NEEDS_ZYGOTE
def test_hostile_converters_plant_nothing(
    base: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, data in FILES.items():
        (base / "in" / name).write_bytes(data)
    out = base / "out"
    out.mkdir()
    (out / "precious.txt").write_text("PRECIOUS")
    host = base / "host.txt"
    host.write_text("HOST")
    journal = out / "sandboxrun-journal.jsonl"
    key = journaling.default_key_path(journal)
    _predictable_names(monkeypatch)
    result = runner.invoke(app, [
        "batch", str(base / "in"), "--out", str(out), "--no-progress", "--backend", backend,
        "-j", "2", "-t", f"{4 * SCALE}s",
        "--cmd", f"{PY} {base / 'conv.py'} {{input}} {{output}} {out} {key} {host}",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    records = {entry["file"]: entry for entry in _journal(journal)}
    assert {name: entry["verdict"] for name, entry in records.items()} == EXPECTED
    assert {entry["isolation"] for entry in records.values()} == {"strict"}
    # The good files, byte for byte; nothing of the failed, killed or timed-out ones.
    assert (out / "good.txt").read_text() == "GOOD HELLO"
    assert (out / "sub" / "deep.txt").read_text() == "GOOD DEEP"
    # (a) another file of --out: untouched, and nothing planted next to it.
    assert (out / "precious.txt").read_text() == "PRECIOUS"
    assert not (out / "planted.txt").exists()
    attempts = (out / "overwrite.txt").read_text().splitlines()[1:]
    assert attempts == ["refused (Read-only file system)"] * 2, attempts
    # (b) the journal: only our sealed lines; its key unchanged and never read.
    lines = journal.read_text().splitlines()
    assert len(lines) == len(FILES) and all('"mac"' in line for line in lines)
    assert key.read_text() != "00" * 32
    notes = (out / "journal.txt").read_text()
    assert key.read_text() not in notes and "key unreadable" in notes, notes
    assert notes.count("read-only mount") == 2 and "WRITABLE" not in notes, notes
    # (c) a symlink to a host file, (d) a hard link, (e) a FIFO: refused, the host file intact.
    assert host.read_text() == "HOST" and host.stat().st_nlink == 1
    for name, why in (
        ("symlink.txt", "symlink"),
        ("hardlink.txt", "hard links"),
        ("fifo.txt", "FIFO"),
    ):
        assert why in records[name]["output_problem"], records[name]
        assert records[name]["output"] == []
        assert not os.path.lexists(out / name) and not os.path.lexists(out / f"{name}.2")
    # (f) the neighbour's staging folder: closed to the attacker; the victim's bytes are its own.
    assert (out / "z-victim.txt").read_text() == "SLOWAPPEND VICTIM"
    assert not (out / "extra.txt").exists()
    attempts = (out / "y-neighbour.txt").read_text().splitlines()[1:]
    # The neighbour's folder is its uid's, 0700: refused before its read-only mount is reached
    # (which alone stops it too: test_each_task_writes_only_its_own_read_write_paths).
    assert attempts[:2] == ["refused (Permission denied)"] * 2, attempts
    assert attempts[2] == "refused (Permission denied)"  # and it cannot even list them (0711)
    # (g) a set-uid file: moved with the manager's owner and a plain mode.
    info = (out / "setuid.txt").stat()
    assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())
    assert info.st_mode & 0o7777 == 0o666 & ~_umask()
    assert records["setuid.txt"]["output"] == ["setuid.txt"]
    # Nothing else in --out, no staging folder left.
    made = {str(path.relative_to(out)) for path in out.rglob("*")}
    wanted = {name for name, verdict in EXPECTED.items() if verdict == "ok"}
    assert made == wanted | {"sub", "precious.txt", "sandboxrun-journal.jsonl"}
    assert "no output" in result.output and "output refused" in result.output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_sigkilled_batch_leaves_staging_that_the_next_start_removes(base: Path) -> None:
    for index in range(6):
        (base / "in" / f"{index}.txt").write_bytes(b"SLOWAPPEND x")
    out = base / "out"
    args = ["batch", str(base / "in"), "--out", str(out), "--no-progress", "-j", "2",
            "--cmd", f"{PY} {base / 'conv.py'} {{input}} {{output}} {out} k h"]  # fmt: skip
    process = subprocess.Popen(
        [PY, "-m", "sandboxrun", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "SANDBOXRUN_ISOLATION": ""},
    )  # fmt: skip
    journal = out / "sandboxrun-journal.jsonl"
    from .conftest import wait_until

    assert wait_until(lambda: journal.exists() and journal.read_text().count("\n") >= 2, 60)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    left = list((out / ".sandboxrun-staging").iterdir())
    assert left, "a SIGKILLed batch leaves its staging run (the next start removes it)"
    done = subprocess.run(
        [PY, "-m", "sandboxrun", *args, "--resume"],
        capture_output=True,
        timeout=120 * SCALE,
        env={**os.environ, "SANDBOXRUN_ISOLATION": ""},
    )
    assert done.returncode == 0, done.stderr.decode()
    assert not (out / ".sandboxrun-staging").exists()
    assert sorted(entry["file"] for entry in _journal(journal)) == [f"{i}.txt" for i in range(6)]
    for index in range(6):  # each output whole, written once (a rerun does not append twice)
        assert (out / f"{index}.txt").read_text() == "SLOWAPPEND X"


@NEEDS_ZYGOTE
def test_strict_default_falls_back_with_a_warning_where_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sandboxrun._cli.options import batch_isolation

    monkeypatch.delenv("SANDBOXRUN_ISOLATION", raising=False)
    tmp_path.chmod(0o755)
    assert batch_isolation(None, (tmp_path,)) is STRICT
    assert batch_isolation("default", (tmp_path,)) == "default"
    if os.geteuid() != 0:
        return  # the closed-folder rule is about another uid: root managers only
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    assert batch_isolation(None, (closed / "out",)) is None  # the manager's default
    assert "NOT run under the strict profile" in caplog.text and str(closed) in caplog.text
    import typer

    with pytest.raises(typer.Exit):
        batch_isolation("strict", (closed / "out",))


# {out_dir}: the command picks its files' names (soffice --outdir): one named like the journal
# would replace it on the move (the read-only mount cannot stop that: it happens in the manager).
OUTDIR_CONVERTER = r"""
import pathlib, sys
src, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
word = src.read_bytes().split()[0]
if word == b"JOURNAL":
    (folder / "sandboxrun-journal.jsonl").write_text('{"file": "x", "verdict": "ok"}\n')
elif word == b"STAGING":
    (folder / ".sandboxrun-staging").mkdir()
    (folder / ".sandboxrun-staging" / "x").write_text("planted")
elif word != b"NOTHING":
    (folder / f"{src.stem}.out").write_bytes(src.read_bytes().upper())
"""


def test_out_dir_outputs_cannot_replace_the_journal(base: Path) -> None:
    files = {"a.txt": b"GOOD a", "j.txt": b"JOURNAL", "s.txt": b"STAGING", "n.txt": b"NOTHING"}
    for name, data in files.items():
        (base / "in" / name).write_bytes(data)
    (base / "outdir.py").write_text(OUTDIR_CONVERTER)
    out = base / "out"
    result = runner.invoke(app, [
        "batch", str(base / "in"), "--out", str(out), "--no-progress",
        "--cmd", f"{PY} {base / 'outdir.py'} {{input}} {{out_dir}}",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = (out / "sandboxrun-journal.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all('"mac"' in line for line in lines)
    records = {entry["file"]: entry for entry in map(json.loads, lines)}
    assert {name: entry["verdict"] for name, entry in records.items()} == {
        "a.txt": "ok", "j.txt": "no output", "s.txt": "no output", "n.txt": "no output"
    }  # fmt: skip
    assert "journal" in records["j.txt"]["output_problem"]
    assert "staging" in records["s.txt"]["output_problem"]
    assert "wrote no output" in records["n.txt"]["output_problem"]
    assert records["a.txt"]["output"] == ["a.out"]
    assert (out / "a.out").read_text() == "GOOD A"
    assert sorted(path.name for path in out.iterdir()) == ["a.out", "sandboxrun-journal.jsonl"]


@pytest.mark.parametrize(
    "start_method", ["zygote"] if ZYGOTE_AVAILABLE else []
)
def test_each_task_writes_only_its_own_read_write_paths(base: Path, start_method: str) -> None:
    """The per-task hook under every start method: a task's read_write_paths are its alone."""
    from sandboxrun import CommandTask, ProcessManager

    mine, theirs = base / "mine", base / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        folder.chmod(0o777)
    script = "import sys; open(sys.argv[1], 'w').write('x')"
    tasks = [
        CommandTask([PY, "-c", script, str(mine / "a")], read_write_paths=[str(mine)]),
        CommandTask([PY, "-c", script, str(theirs / "b")], read_write_paths=[str(mine)]),
        CommandTask([PY, "-c", script, str(theirs / "c")]),
    ]
    with ProcessManager(2, 20, isolation="strict", start_method=start_method) as manager:
        for task in tasks:
            manager.queue_task(task)
    results = {id(result.task): result for result in manager.task_results}
    assert [results[id(task)].success for task in tasks] == [True, False, False]
    assert (mine / "a").read_text() == "x"
    assert not (theirs / "b").exists() and not (theirs / "c").exists()
    assert "Read-only file system" in str(results[id(tasks[1])].exception)


# Waits (its folder holding "ready") until the test puts "go" there, then writes its output.
WAITING_CONVERTER = r"""
import os, pathlib, sys, time
src, dst = map(pathlib.Path, sys.argv[1:3])
(dst.parent / "ready").write_text(str(os.getuid()))
deadline = time.monotonic() + 600
while not (dst.parent / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
for name in ("ready", "go"):
    (dst.parent / name).unlink()
dst.write_bytes(src.read_bytes().upper())
"""


def _create_as(uid: int, folder: Path) -> int:
    """0 when uid ``uid`` could create a file in ``folder``, else the errno it got."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
            os.close(os.open(folder / "intruder", flags, 0o644))
        except OSError as error:
            code = error.errno or 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid's task and an intruder: root only")
@pytest.mark.parametrize(
    ("backend", "isolation"),
    [
        *((kernel, "strict") for kernel in KERNEL_BACKENDS[:1]),
        *([("psutil", "strict")] if "psutil" in AVAILABLE else []),
        *((kernel, "default") for kernel in KERNEL_BACKENDS[:1]),
    ],
)
@NEEDS_ZYGOTE
def test_a_running_tasks_staging_folder_is_its_uid_alone(
    base: Path, backend: str, isolation: str
) -> None:
    """While the task runs, its staging folder (and the parent made in it) is 0700 and owned by
    the uid the task acts as there (the slot's under strict, the manager's under default, where
    it is handed idmapped): another local user who learnt its name cannot drop a file into it.
    Once done, the output is the manager's."""
    files = {"a.txt": b"first", "sub/b.txt": b"second"}
    for name, data in files.items():
        (base / "in" / name).write_bytes(data)
    (base / "wait.py").write_text(WAITING_CONVERTER)
    out = base / "out"
    process = subprocess.Popen(
        [PY, "-m", "sandboxrun", "batch", str(base / "in"), "--out", str(out), "--no-progress",
         "-j", "2", "--backend", backend, "--isolation", isolation,
         "--cmd", f"{PY} {base / 'wait.py'} {{input}} {{output}}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "SANDBOXRUN_ISOLATION": ""},
    )  # fmt: skip
    try:
        from .conftest import wait_until

        staging = out / ".sandboxrun-staging"
        ready = lambda: sorted(staging.glob("*/*/**/ready")) if staging.is_dir() else []  # noqa: E731
        assert wait_until(lambda: len(ready()) == 2 or process.poll() is not None, 120)
        assert process.poll() is None, process.communicate()[1].decode()
        owners = set()
        for flag in ready():
            task_uid = int(flag.read_text())
            folder = flag.parent
            top = folder if folder.parent.parent == staging else folder.parent
            assert top.parent.parent == staging, folder
            assert _create_as(65534, folder) == errno.EACCES, f"uid 65534 wrote into {folder}"
            assert not (folder / "intruder").exists()
            # strict: the folder is given to the slot's uid; default: it stays the manager's
            # on disk and is handed to the task idmapped (it acts there as the manager).
            owner = task_uid if isolation == "strict" else os.geteuid()
            for made in {top, folder}:  # the file's folder, and the parent made in it (sub/)
                info = made.stat()
                assert (info.st_uid, info.st_mode & 0o7777) == (owner, 0o700), made
            owners.add(task_uid)
        # a uid per slot under both: the two tasks are not each other's
        assert owners == {DEFAULT_UID_BASE, DEFAULT_UID_BASE + 1}
        for flag in ready():
            (flag.parent / "go").write_text("")
        _, stderr = process.communicate(timeout=120 * SCALE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    for name, data in files.items():
        info = (out / name).stat()
        assert (out / name).read_bytes() == data.upper()
        assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())
    assert not staging.exists()


@pytest.mark.parametrize(
    "start_method", ["zygote"] if ZYGOTE_AVAILABLE else []
)
def test_a_launch_hook_runs_in_the_manager_with_the_tasks_uid(start_method: str) -> None:
    """The hook ``sandboxrun batch`` hands folders over with: called once per task, before it
    starts, with the uid it runs as; it never travels with the task (pickled: None)."""
    import pickle

    from sandboxrun import CommandTask, ProcessManager
    from sandboxrun._task import LaunchHook

    seen: list[tuple[int, int] | None] = []
    task = CommandTask([PY, "-c", "import os; print(os.getuid())"])
    task._launch_hook = LaunchHook(seen.append)
    assert pickle.loads(pickle.dumps(task))._launch_hook is None
    with ProcessManager(1, 20, isolation="strict", start_method=start_method) as manager:
        manager.queue_task(task)
    (result,) = manager.task_results
    assert result.success, result.exception
    uid = DEFAULT_UID_BASE if os.geteuid() == 0 else None
    assert seen == [None if uid is None else (uid, uid)]
    if uid is not None:  # not root: uid 0 of the task's user namespace, ours outside
        assert int(result.result.stdout) == uid
