"""What a zygote's task carries: no module it did not ask for that costs every fork.

threading, logging and multiprocessing register at-fork hooks (threading's reinit, logging's
lock reinit, random's reseed through tempfile) that ran in every task the zygote forked, and their
Python code wrote pages shared with the zygote: from the fork to the child's first line took
489 us of CPU and 254 page faults, 130 us and 65 without them. ctypes was the syscall layer (now
compiled: sandboxrun._native). These tests keep it so.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandboxrun import ProcessManager, Task
from sandboxrun._launch import ZYGOTE_AVAILABLE

from . import lean_module

pytestmark = pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="no zygote launcher here")

AT_FORK_COSTLY = ("threading", "logging", "multiprocessing", "tempfile", "random", "subprocess")


def _one(task: Task) -> object:
    # A zygote of its own (a new environment is a new pool key): pooled zygotes (cgroup v2,
    # systemd) imported what earlier tasks' modules needed, and a task sees that too.
    with ProcessManager(max_workers=1, env={"LEAN_ZYGOTE_TEST": os.urandom(8).hex()}) as manager:
        manager.queue_task(task)
    (result,) = manager.task_results
    assert result.success, result.exception
    return result.result


@pytest.mark.parametrize("isolation", ["none", "default"])
def test_a_task_of_a_module_that_imports_nothing_has_no_costly_module(
    isolation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXRUN_ISOLATION", isolation)
    loaded = set(_one(Task(lean_module.loaded_modules)))  # type: ignore[call-overload]
    assert "tests.lean_module" in loaded  # the zygote imported the task's module
    assert not loaded & set(AT_FORK_COSTLY), sorted(loaded & set(AT_FORK_COSTLY))
    from sandboxrun._zygote import reaper

    if reaper.native_available():
        assert "ctypes" not in loaded


def test_the_task_makes_its_syscalls_compiled_where_built() -> None:
    from sandboxrun._zygote import reaper

    if not reaper.native_available():
        pytest.skip("sandboxrun._native is not built here")
    assert _one(Task(lean_module.syscalls_compiled)) is True


def test_a_task_module_that_imports_logging_still_gets_sandboxrun_warnings() -> None:
    # The deferred loggers (sandboxrun/_log.py): a record that logging would show is shown, in a
    # process that never imported logging, through logging itself (its last resort, stderr).
    code = (
        "import sys; from sandboxrun import _log; log = _log.get('sandboxrun.t');"
        "log.debug('not shown %s', 1); log.info('not shown'); assert 'logging' not in sys.modules;"
        "log.warning('shown %s', 2); assert 'logging' in sys.modules;"
        "import logging; logging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s');"
        "log.debug('debug now %s', 3)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, check=True)  # fmt: skip
    assert done.stderr.splitlines() == ["shown 2", "sandboxrun.t debug now 3"], done.stderr
