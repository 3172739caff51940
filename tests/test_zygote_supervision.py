"""A zygote that dies under a running task (killed by the OOM killer, an operator, a bug):
its task gets one clear result, its neighbours theirs, and the slot a new zygote.

The zygote is found the way the kernel links it: the task (PID 2 of its namespace) writes its
host pid, its parent is its PID 1, whose parent is the zygote -- a child of this process whose
command line runs ``sandboxrun._zygote.server``. Only that process is killed.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest

from sandboxrun import ProcessManager, Task, WorkerDied
from sandboxrun._launch import ZYGOTE_AVAILABLE

from . import tasks
from .conftest import SCALE, leftover_cgroups, wait_gone, wait_until

pytestmark = pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="no zygote launcher here")

BENIGN = [3, 5, 8]


def _zygote_of(task_pid: int) -> psutil.Process:
    """The zygote serving the task whose host pid is ``task_pid`` (checked, not guessed)."""
    reaper = psutil.Process(task_pid).parent()
    assert reaper is not None
    zygote = reaper.parent()
    assert zygote is not None and zygote.ppid() == os.getpid(), (reaper, zygote)
    assert "sandboxrun._zygote.server" in " ".join(zygote.cmdline()), zygote.cmdline()
    return zygote


def test_zygote_killed_under_a_running_task(backend: str, tmp_path: Path) -> None:
    pid_file, release = tmp_path / "task.pid", tmp_path / "release"
    victim = Task(tasks.wait_for_file, (str(pid_file), str(release), 60.0))
    neighbour = Task(tasks.sleep_then, (1.0 * SCALE, "neighbour"))
    killed: dict[str, int] = {}

    def kill_its_zygote() -> None:
        if wait_until(pid_file.exists, 60):
            task_pid = tasks.read_pid(pid_file)
            zygote = _zygote_of(task_pid)
            killed.update(task=task_pid, zygote=zygote.pid)
            os.kill(zygote.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_its_zygote, daemon=True)
    killer.start()
    with ProcessManager(2, 60 * SCALE, backend=backend, start_method="zygote") as pm:  # type: ignore[arg-type]
        for task in [victim, neighbour, *(Task(tasks.double, (v,)) for v in BENIGN)]:
            pm.queue_task(task)
    killer.join(5)
    release.write_text("")  # whatever happened, a survivor would end now
    assert killed, "the task never started"
    results = {id(r.task): r for r in pm.task_results}
    died = results[id(victim)]
    assert not died.success and isinstance(died.exception, WorkerDied), died
    assert not died.timed_out and not died.out_of_memory
    assert results[id(neighbour)].success and results[id(neighbour)].result == "neighbour"
    doubles = sorted(r.result for r in pm.task_results if r.task.func is tasks.double)
    assert doubles == [2 * v for v in BENIGN]  # the slot went on with a new zygote
    assert len(pm.task_results) == 2 + len(BENIGN)
    # The dead zygote's namespace went with it (PR_SET_PDEATHSIG on PID 1), nothing is left.
    assert wait_gone(killed["task"]), "the task outlived its zygote"
    assert wait_until(lambda: not leftover_cgroups(), 5), leftover_cgroups()


def _our_zygotes() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if "sandboxrun._zygote.server" in " ".join(child.cmdline())
    ]


def test_next_manager_gets_a_new_zygote(backend: str) -> None:
    """Zygotes killed while idle in the pool (between two managers of a server) are noticed
    at the next acquire: that manager's tasks run, none gets a dead worker."""
    with ProcessManager(2, 60 * SCALE, backend=backend, start_method="zygote") as pm:  # type: ignore[arg-type]
        pm.queue_task(Task(tasks.double, (1,)))
    assert pm.task_results[0].success, pm.task_results[0]
    idle = _our_zygotes()
    if not idle:
        pytest.skip(f"{backend}: zygotes do not outlive their manager (per-slot cgroups)")
    for zygote in idle:
        zygote.kill()
    psutil.wait_procs(idle, timeout=5)
    with ProcessManager(2, 60 * SCALE, backend=backend, start_method="zygote") as pm:  # type: ignore[arg-type]
        for value in BENIGN:
            pm.queue_task(Task(tasks.double, (value,)))
    assert sorted(r.result for r in pm.task_results) == [2 * v for v in BENIGN], pm.task_results
    assert all(z.pid not in {c.pid for c in _our_zygotes()} for z in idle)
