"""The default profile: a task gets what it was handed (issue 23, docs/security.md).

Honest Glasswall-shaped code runs unchanged (uploads in a ``mkdtemp()`` folder, outputs beside
them or under /tmp, configuration in the environment); a hostile task meets everything else as
an unprivileged local user: no root file, socket or device of the host, no terminal. Through
the real ``ProcessManager``, under the default profile, as users get it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxrun import ProcessManager, Task
from sandboxrun._isolation.profile import DEFAULT_UID_BASE
from sandboxrun._launch import ZYGOTE_AVAILABLE

from . import profile_tasks as tasks
from .conftest import AVAILABLE

pytestmark = [
    pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="isolation needs the zygote (Linux, pidfds)"),
    pytest.mark.skipif(
        sys.platform.startswith("linux") and os.geteuid() != 0,
        reason="a non-root manager's tasks keep its uid (nothing to hand over)",
    ),
]

ROOT = sys.platform.startswith("linux") and os.geteuid() == 0


#: The backend of this test's tasks (the ``_backend`` fixture): every one available here.
BACKEND = "auto"


@pytest.fixture(autouse=True, params=AVAILABLE)
def _backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test once per backend available here (cgroup_v1 and psutil on this project's
    machine, cgroup_v2 and systemd in its guest): the profile is the zygote's on every one."""
    global BACKEND
    BACKEND = request.param
    yield
    BACKEND = "auto"


def run(func: object, *args: object, **options: object) -> object:
    """One task under the default profile; its value, or the exception it failed with."""
    options.setdefault("backend", BACKEND)
    with ProcessManager(1, worker_timeout_seconds=60, **options) as manager:  # type: ignore[arg-type]
        manager.queue_task(Task(func, args))  # type: ignore[arg-type]
    (result,) = manager.task_results
    assert result.isolation.startswith("default"), result.isolation
    return result.result if result.success else result.exception


@pytest.fixture
def upload_folder() -> Iterator[Path]:
    """What Glasswall's users do: a 0700 mkdtemp() folder under /tmp, a 0600 upload in it."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    (folder / "in.txt").write_text("hello")
    (folder / "in.txt").chmod(0o600)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --- honest code --------------------------------------------------------------------------


def test_mkdtemp_upload_read_and_output_written_beside_it(
    upload_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVERTER_SUFFIX", "!")  # configured through the environment
    assert (upload_folder.stat().st_mode & 0o777) == 0o700
    output = upload_folder / "in.txt.out"
    assert run(tasks.convert, str(upload_folder / "in.txt"), str(output)) == str(output)
    assert output.read_text() == "HELLO!"
    assert output.stat().st_uid == os.geteuid()  # landed as the manager's, not the task's uid
    assert not (upload_folder / "in.txt.out.part").exists()


def test_output_directly_under_tmp(upload_folder: Path) -> None:
    output = Path(f"/tmp/sandboxrun-test-{uuid.uuid4().hex}.out")
    try:
        assert run(tasks.convert, str(upload_folder / "in.txt"), str(output)) == str(output)
        assert output.read_text() == "HELLO"
    finally:
        output.unlink(missing_ok=True)


def test_an_upload_directly_under_tmp_is_handed_alone() -> None:
    """A 0600 file of the manager's directly in /tmp: that file alone is handed (a bind of it),
    read and rewritten in place; /tmp itself is not."""
    path = Path(f"/tmp/sandboxrun-test-{uuid.uuid4().hex}.txt")
    path.write_text("alone")
    path.chmod(0o600)
    try:
        assert run(tasks.write_and_read_back, str(path), "changed") == "changed"
        assert path.read_text() == "changed" and path.stat().st_uid == os.geteuid()
    finally:
        path.unlink(missing_ok=True)


def test_path_objects_are_handed_too(upload_folder: Path) -> None:
    output = upload_folder / "out.txt"
    assert run(tasks.write_and_read_back, output, "x") == "x"
    assert output.stat().st_uid == os.geteuid()


def test_relative_output_in_a_job_folder_under_tmp(
    upload_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(upload_folder)  # the working folder is handed
    assert run(tasks.write_relative, "out.txt", "data") == str(upload_folder / "out.txt")
    assert (upload_folder / "out.txt").read_text() == "data"


def test_environment_is_the_managers_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXRUN_TEST_SETTING", "from the manager")
    assert run(tasks.environment, "SANDBOXRUN_TEST_SETTING") == "from the manager"
    overridden = run(tasks.environment, "SANDBOXRUN_TEST_SETTING", env={
        "SANDBOXRUN_TEST_SETTING": "from env="})  # fmt: skip
    assert overridden == "from env="


def test_honest_work_inside_the_task() -> None:
    found = run(tasks.honest_work)
    assert found == {"subprocess": "hi\n", "thread": [1], "pool": [1, 2, 3]}, found


def test_a_write_that_cannot_land_fails_loudly() -> None:
    """Not handed, not writable by a local user: an error, never success with the data gone."""
    target = f"/usr/local/sandboxrun-test-output-{uuid.uuid4().hex}"
    try:
        outcome = run(tasks.write_and_read_back, target, "x")
        assert isinstance(outcome, OSError), outcome
        assert not os.path.exists(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)


# --- never host root ----------------------------------------------------------------------


def test_the_task_is_never_host_root() -> None:
    uid, gid = run(tasks.ids)  # type: ignore[misc]
    assert uid != 0 and gid != 0
    assert DEFAULT_UID_BASE <= uid < DEFAULT_UID_BASE + 1024


@pytest.mark.parametrize(
    "folder",
    ["/opt", "/var/lib/dpkg/info", "/usr/local/bin", "/etc", "/root",
     os.path.dirname(os.path.dirname(tasks.__file__)),  # beside the tests' modules (sys.path)
     os.path.dirname(os.__file__)],  # the standard library
)  # fmt: skip
def test_no_persistence_in_host_folders(folder: str) -> None:
    if not os.path.isdir(folder):
        pytest.skip(f"no {folder} here")
    outcome = run(tasks.create_and_remove, folder)
    assert str(outcome).startswith("refused"), outcome


def test_no_persistence_in_the_first_folder_of_roots_path() -> None:
    first = os.environ.get("PATH", "").split(os.pathsep)[0]
    if not first or not os.path.isdir(first):
        pytest.skip("no PATH folder")
    outcome = run(tasks.create_and_remove, first)
    assert str(outcome).startswith("refused"), outcome


def test_shell_start_up_file_not_open_for_append() -> None:
    startup = os.path.expanduser("~/.bashrc")
    if not os.path.exists(startup):
        pytest.skip("no ~/.bashrc")
    outcome = run(tasks.open_for_append, startup)
    assert str(outcome).startswith("refused"), outcome


def test_shadow_unreadable() -> None:
    outcome = run(tasks.read_file, "/etc/shadow")
    assert str(outcome).startswith("refused"), outcome


def test_root_socket_in_a_0700_folder_under_tmp() -> None:
    """tmux's /tmp/tmux-0/default takes commands from any uid-0 peer: as another uid the task
    cannot even reach it. The task is given only the folder's name (nothing handed)."""
    folder = Path(tempfile.mkdtemp(prefix="sandboxrun-sock-", dir="/tmp"))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(folder / "default"))
        server.listen(1)
        os.chmod(folder / "default", 0o777)
        outcome = run(tasks.connect_unix_in_tmp, folder.name)
        assert str(outcome).startswith("refused") and "Permission denied" in str(outcome)
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


# --- devices and terminals ----------------------------------------------------------------


def test_a_private_minimal_dev() -> None:
    assert run(tasks.dev_listing) == sorted([
        "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
        "stdout", "tty", "urandom", "zero"])  # fmt: skip


@pytest.mark.parametrize(
    "device", ["/dev/kvm", "/dev/loop-control", "/dev/loop0", "/dev/vcs", "/dev/mem", "/dev/sda",
               "/dev/vda", "/dev/console", "/dev/tty1", "/dev/pts/0"],
)  # fmt: skip
def test_host_devices_unreachable(device: str) -> None:
    outcome = run(tasks.open_device, device)
    assert str(outcome).startswith("refused") and "No such file" in str(outcome), outcome


def test_nothing_planted_in_dev() -> None:
    outcome = run(tasks.create_and_remove, "/dev")
    assert str(outcome).startswith("refused"), outcome


def test_no_controlling_terminal() -> None:
    outcome = run(tasks.controlling_terminal)
    assert str(outcome).startswith("refused"), outcome


def test_ptys_of_its_own_work() -> None:
    assert run(tasks.open_pty) == "opened"


# --- start methods ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_other_start_methods_are_refused_naming_the_zygote(method: str) -> None:
    with pytest.raises(ValueError, match="zygote"):
        ProcessManager(1, start_method=method)  # type: ignore[arg-type]
    with ProcessManager(1, start_method=method, isolation="none") as manager:  # type: ignore[arg-type]
        manager.queue_task(Task(tasks.ids))
    assert manager.task_results[0].result == (os.getuid(), os.getgid())


# --- the kernel's shared objects: keyrings, namespaces, the operator's terminal --------------


def test_keyrings_unreachable() -> None:
    found = run(tasks.keyrings)
    if "skipped" in found:  # type: ignore[operator]
        pytest.skip(str(found))
    assert all(outcome.startswith("refused") for outcome in found.values()), found  # type: ignore[union-attr]


def test_no_new_namespaces_and_no_ptrace() -> None:
    """A fresh user + cgroup namespace is the way to a cgroup2 mount of one's own (a uid-0 task
    wrote the host's root knobs through one); ptrace of PID 1 the way out of the sandbox."""
    found = run(tasks.new_namespaces)
    if "skipped" in found:  # type: ignore[operator]
        pytest.skip(str(found))
    assert all(outcome.startswith("refused") for outcome in found.values()), found  # type: ignore[union-attr]


_TERMINAL_MANAGER = """
import fcntl, json, os, sys, termios
sys.path.insert(0, {root!r})
from sandboxrun import ProcessManager, Task
from tests import profile_tasks
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is the manager's controlling terminal
with ProcessManager(1, 20) as pm:
    pm.queue_task(Task(profile_tasks.inject_into_terminal, (1,)))
os.set_blocking(0, False)
try:
    pending = os.read(0, 100).decode()
except BlockingIOError:
    pending = ""
with open({report!r}, "w") as report:
    json.dump([pm.task_results[0].result, pm.task_results[0].isolation, pending], report)
"""


def test_no_tiocsti_into_the_operators_terminal(tmp_path: Path) -> None:
    """The manager runs in a terminal (a real pty, its controlling one); the task's stdout is
    that terminal. Pushing "echo pwned" into its input would run it in the operator's shell."""
    import pty
    import subprocess

    leader, follower = pty.openpty()
    report = tmp_path / "report.json"
    script = _TERMINAL_MANAGER.format(root=str(Path(__file__).parents[1]), report=str(report))
    try:
        process = subprocess.run(  # the watchdog: a manager that hangs is killed, not awaited
            [sys.executable, "-c", script], stdin=follower, stdout=follower, stderr=follower,
            start_new_session=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(follower)
        os.set_blocking(leader, False)
        try:
            output = os.read(leader, 65536).decode(errors="replace")
        except OSError:
            output = ""
        os.close(leader)
    assert process.returncode == 0, output
    import json

    outcome, isolation, pending = json.loads(report.read_text())
    assert isolation == "default"
    assert outcome.startswith("refused"), outcome
    assert "pwned" not in pending


def test_pid1_and_its_host_mount_table_are_out_of_sight() -> None:
    """PID 1, the reaper, stays in the zygote's mount namespace: its /proc/1/mountinfo would
    show the host's mount table. The task's /proc shows its own processes only (hidepid)."""
    outcome = run(tasks.pid1_mount_table)
    assert str(outcome).startswith("refused"), outcome
    assert 1 not in run(tasks.visible_processes)  # type: ignore[operator]


# --- a filesystem that cannot be idmapped -------------------------------------------------


@pytest.fixture
def ramfs_folder(tmp_path: Path) -> Iterator[Path]:
    """A ramfs (no idmapped mounts: no FS_ALLOW_IDMAP) mounted for this test, removed after."""
    import subprocess

    folder = tmp_path / "ramfs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a ramfs here")
    try:
        folder.chmod(0o700)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_filesystem_that_cannot_be_idmapped_keeps_honest_code_working(
    ramfs_folder: Path,
) -> None:
    """The fallback: the task keeps the manager's uid (the other measures stay), and says so."""
    (ramfs_folder / "in.txt").write_text("hello")
    output = ramfs_folder / "out.txt"
    with ProcessManager(1, worker_timeout_seconds=60, backend=BACKEND) as manager:  # type: ignore[arg-type]
        manager.queue_task(Task(tasks.convert, (str(ramfs_folder / "in.txt"), str(output))))
        manager.queue_task(Task(tasks.ids))  # nothing handed: the slot's uid as always
    converted, plain = manager.task_results
    assert converted.success, converted.exception
    assert output.read_text() == "HELLO"
    assert converted.isolation.startswith("default (kept the manager's uid"), converted.isolation
    assert plain.isolation == "default" and plain.result[0] >= DEFAULT_UID_BASE


# --- the rest of the measurements --------------------------------------------------


def test_dev_shm_is_bounded_by_the_memory_limit_on_psutil() -> None:
    """The psutil monitor polls RSS: tmpfs pages are nobody's there. The private /dev/shm is
    sized to the memory limit (measured before: 400 MiB into the host's /dev/shm under 256)."""
    outcome = run(tasks.fill_dev_shm, 96, backend="psutil", memory_limit_in_gib=64 / 1024)
    assert str(outcome).startswith("refused") and "No space left" in str(outcome), outcome


def test_a_zygote_with_a_thread_refuses_an_isolated_task(tmp_path: Path) -> None:
    """unshare(CLONE_NEWPID) needs a single-threaded caller: an isolated task is refused, not
    run weaker (it ran without a PID namespace, with a warning only, before)."""
    from sandboxrun._zygote.client import POOL

    from . import threaded_module

    try:
        with ProcessManager(1, worker_timeout_seconds=60, backend=BACKEND) as manager:  # type: ignore[arg-type]
            manager.queue_task(Task(threaded_module.pid_and_orphan, (str(tmp_path / "p"),)))
    finally:
        POOL.close()  # the threaded zygotes must not serve the next tests
    (result,) = manager.task_results
    assert not result.success and "started a thread in the zygote" in str(result.exception)
    assert not (tmp_path / "p").exists()  # no task code ran


@pytest.mark.parametrize("method", ["zygote", "fork", "spawn"])
def test_env_reaches_the_task_alike_under_every_start_method(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One builder: the manager's environment with env= on top, whatever starts the task."""
    monkeypatch.setenv("SANDBOXRUN_TEST_BASE", "base")
    isolation = "default" if method == "zygote" else "none"
    with ProcessManager(1, 60, start_method=method, isolation=isolation,  # type: ignore[arg-type]
                        env={"SANDBOXRUN_TEST_EXTRA": "extra"}) as manager:  # fmt: skip
        manager.queue_task(Task(tasks.environment, ("SANDBOXRUN_TEST_BASE",)))
        manager.queue_task(Task(tasks.environment, ("SANDBOXRUN_TEST_EXTRA",)))
    assert sorted(r.result for r in manager.task_results) == ["base", "extra"]


def test_a_closed_mount_point_above_what_was_handed(tmp_path: Path) -> None:
    """The closed folder above a handed one is a mount point of the host's own (a 0700 data
    volume): it is covered like any closed folder, not taken for the view's cover."""
    import subprocess

    volume = tmp_path / "volume"
    volume.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=700", "tmpfs", str(volume)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        from sandboxrun._isolation import _idmap

        why = _idmap.probe(str(volume), _idmap.user_namespace(DEFAULT_UID_BASE, DEFAULT_UID_BASE))
        if why is not None:  # tmpfs before Linux 6.3: the task would keep the manager's uid
            pytest.skip(why)
        (volume / "job").mkdir()
        (volume / "job" / "in.txt").write_text("volume")
        (volume / "other-job.txt").write_text("not handed")
        outcome = run(tasks.convert, str(volume / "job" / "in.txt"), str(volume / "job" / "o"))
        assert outcome == str(volume / "job" / "o"), outcome
        assert (volume / "job" / "o").read_text() == "VOLUME"
        other = run(tasks.read_beside, str(volume / "job"), "other-job.txt")  # not handed
        assert str(other).startswith("refused") and "No such file" in str(other), other
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def test_no_set_uid_program_in_a_handed_folder(upload_folder: Path) -> None:
    """On a handed folder the task acts as the manager (root): a file it made set-uid would be
    a set-uid-root program on the host for whoever runs it from there later. The filter refuses
    any file mode with S_ISUID or S_ISGID (chmod, creation)."""
    found = run(tasks.make_set_id, str(upload_folder))
    assert found and all(v.startswith("refused") for v in found.values()), found  # type: ignore[union-attr]
    assert not [p for p in upload_folder.iterdir() if p.stat().st_mode & 0o6000]
