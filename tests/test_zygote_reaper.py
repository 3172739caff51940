"""The zygote's PID 1 in C (sandboxrun/_native.c) and its pure-Python twin: both give the task
the same namespace, /proc and verdicts; the C one runs no Python (its page faults show it).

``SANDBOXRUN_NATIVE=0`` selects the Python PID 1 per launch; scripts/test.sh also runs the fault
matrix, the isolation and supervision tests that way.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sysconfig
import time
from pathlib import Path

import pytest

from sandboxrun import Isolation, ProcessManager, Task
from sandboxrun._isolation import DEFAULT
from sandboxrun._launch import ZYGOTE_AVAILABLE

from . import tasks
from .conftest import gone, wait_gone

pytestmark = pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="no zygote launcher here")


@pytest.fixture(params=["native", "python"])
def pid1(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from sandboxrun._zygote import reaper

    if request.param == "native" and not reaper.native_available():
        pytest.skip("sandboxrun._native is not built here")
    monkeypatch.setenv("SANDBOXRUN_NATIVE", "1" if request.param == "native" else "0")
    return str(request.param)


def _can_compile() -> bool:
    include = sysconfig.get_paths().get("include", "")
    return shutil.which("gcc") is not None and os.path.exists(os.path.join(include, "Python.h"))


@pytest.mark.skipif(not _can_compile(), reason="no C compiler or Python headers here")
def test_the_native_pid1_is_built_where_it_can_be() -> None:
    """A silent build failure would fall back to the slower PID 1 unnoticed."""
    from sandboxrun._zygote import reaper

    assert reaper.native_available()


def proc_view() -> tuple[int, str, list[int]]:
    """What the task sees of processes: its pid, /proc/self, and every pid in its /proc."""
    return (os.getpid(), os.readlink("/proc/self"),
            sorted(int(name) for name in os.listdir("/proc") if name.isdigit()))  # fmt: skip


def pid1_faults() -> int:
    """Minor page faults of our PID 1 (field 10 of /proc/1/stat)."""
    with open("/proc/1/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[7])


#: The default profile but the task keeps the manager's uid (PID 1's): its /proc lists PID 1.
_KEEP_UID = dataclasses.replace(DEFAULT, name="default-keep-uid", user=None)


def _run(*tasks_: Task, isolation: str | Isolation = "default") -> list:  # type: ignore[type-arg]
    with ProcessManager(1, 30, isolation=isolation, start_method="zygote") as pm:  # type: ignore[arg-type]
        for task in tasks_:
            pm.queue_task(task)
    return list(pm.task_results)


def test_the_task_sees_its_own_namespace_in_a_fresh_proc(pid1: str) -> None:
    (result,) = _run(Task(proc_view))
    assert result.success, result.exception
    pid, self_link, pids = result.result
    assert (pid, self_link) == (2, "2")  # PID 2 below its reaper, and /proc is its namespace's
    # nothing of the host's (not the manager, not the zygote), and not even its reaper: a task
    # under another uid sees its own processes only (hidepid=2)
    assert pids == [2], pids
    (result,) = _run(Task(proc_view), isolation=_KEEP_UID)
    assert result.result[2] == [1, 2], result.result  # the same uid as PID 1: it is listed


def test_the_native_pid1_runs_no_python(pid1: str) -> None:
    """The C PID 1 writes its stack and little else; a Python one ran the interpreter's
    after-fork work (~400 faults here). Measured from inside the task's fresh /proc, by a task
    that keeps PID 1's uid (under another one it would not see PID 1 at all)."""
    results = _run(*(Task(pid1_faults) for _ in range(3)), isolation=_KEEP_UID)
    faults = [r.result for r in results]
    assert all(r.success for r in results), [r.exception for r in results]
    if pid1 == "native":
        assert max(faults) < 100, faults
    else:
        assert min(faults) > 100, faults


def test_self_kill_and_an_orphan_daemon(pid1: str, tmp_path: Path) -> None:
    """The reaper's two duties: the task's own status (SIGKILL is not dropped: the task is not
    PID 1), and the namespace's end taking an orphaned setsid grandchild with it."""
    pid_file = tmp_path / "daemon.pid"
    orphan = Task(tasks.fork_grandchild_and_exit, (str(pid_file),))
    killed, orphaned = _run(Task(tasks.kill_self), orphan, isolation="none")
    assert not killed.success and killed.exit_code == -9, killed
    assert orphaned.success, orphaned.exception
    daemon = tasks.read_pid(pid_file)  # its host pid
    assert wait_gone(daemon) and gone(daemon)


def reach_pid1() -> dict[str, str]:
    """What the task gets of its PID 1, which lives in the zygote's mount namespace."""
    found = {}
    for what, attempt in (("root", lambda: os.listdir("/proc/1/root")),
                          ("cwd", lambda: os.readlink("/proc/1/cwd")),
                          ("environ", lambda: Path("/proc/1/environ").read_bytes()),
                          ("mem", lambda: os.close(os.open("/proc/1/mem", os.O_RDONLY))),
                          ("fd", lambda: [os.readlink(f"/proc/1/fd/{fd}")
                                          for fd in os.listdir("/proc/1/fd")]),
                          ("stop", lambda: os.kill(1, 19)),  # SIGSTOP: no reaping after it
                          ("kill", lambda: os.kill(1, 9))):  # fmt: skip
        try:
            attempt()
            found[what] = "reached"
        except OSError as error:
            found[what] = type(error).__name__
    time.sleep(0.1)
    try:
        with open("/proc/1/stat") as stat:
            found["pid1_state"] = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # hidepid: another uid's process is not even listed
        found["pid1_state"] = "hidden"
    return found


@pytest.mark.parametrize("isolation", ["default", "strict"])
def test_the_task_cannot_reach_its_pid1(pid1: str, isolation: str) -> None:
    """PID 1 keeps the zygote's mounts and every capability: ptrace-mode access (its root,
    cwd, environ, mem, fds) needs CAP_SYS_PTRACE, which the task has not; signals from inside
    its namespace are dropped (none has a handler), SIGSTOP and SIGKILL too (under strict the
    other uid is refused them): PID 1 still runs, and the task ends normally after."""
    (result,) = _run(Task(reach_pid1), isolation=isolation)
    assert result.success, result.exception
    signals = ("stop", "kill")  # sent (or refused): what counts is PID 1's state after
    assert "reached" not in {v for k, v in result.result.items() if k not in signals}, result.result
    # Not stopped, not gone: as seen from inside where PID 1 is listed; hidden (another uid)
    # the task's own success says it (a stopped PID 1 reaps nothing: the task would time out).
    assert result.result["pid1_state"] in ("S", "R", "hidden"), result.result


def test_a_zygote_with_a_thread_forks_without_a_namespace(pid1: str, tmp_path: Path) -> None:
    """An imported module started a thread in the zygote: no PID namespace then (the kernel
    refuses it to a threaded caller). PID 1 is then an ordinary child subreaper, the task runs
    with the host's /proc, and its orphan still dies with it (collected from the subreaper's
    tree and the slot's cgroup)."""
    from sandboxrun._zygote.client import POOL

    from . import threaded_module

    pid_file = tmp_path / "orphan.pid"
    try:
        (result,) = _run(Task(threaded_module.pid_and_orphan, (str(pid_file),)), isolation="none")
    finally:
        POOL.close()  # the threaded zygotes must not serve the next tests
    assert result.success, result.exception
    seen, host = result.result
    assert seen == host and seen > 2  # no namespace of its own: its pid is the host's
    orphan = tasks.read_pid(pid_file)
    assert wait_gone(orphan) and gone(orphan)


def test_a_cgroup_pid1_cannot_enter_fails_the_task_before_its_code(
    pid1: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PID 1 enters the task's cgroups before PID 2 exists (a per-task cgroup on v2, a systemd
    scope it may enter); if it cannot, PID 2 reports why and runs nothing of the task's."""
    from sandboxrun._backends.psutil_monitor import PsutilSandbox

    missing = str(tmp_path / "no-such-cgroup" / "cgroup.procs")
    monkeypatch.setattr(PsutilSandbox, "enter_files", lambda self: (missing,))
    marker = tmp_path / "ran"
    with ProcessManager(1, 30, backend="psutil", start_method="zygote") as pm:  # type: ignore[arg-type]
        pm.queue_task(Task(tasks.touch_after, (str(marker), 0.0)))
    (result,) = pm.task_results
    assert not result.success and result.exit_code == 71, result  # EXIT_ENTER_FAILED
    assert missing in str(result.exception) and "No such file" in str(result.exception)
    assert not marker.exists()  # the task's code never ran
