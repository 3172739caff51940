"""The Glasswall manager's contract (issue 13, points 1-4 and 7) and the seed's three examples.

1. ``0`` means "no limit" (``max_workers=0``: the CPUs), ``max_workers=2.0`` works;
2. ``start_tasks()`` is public; 3. a manager runs again, its results accumulating;
4. an ``Exception`` in the with-body lets the queued work finish, a ``KeyboardInterrupt`` (any
   non-``Exception``) stops everything at once; 7. exit codes are ``multiprocessing.Process``'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from sandboxrun import ProcessManager, Task, TaskResult
from sandboxrun._cpus import available_cpus
from sandboxrun._limits import DEFAULT_MAX_PROCESSES, Limits

from . import tasks
from .conftest import leftover_cgroups, wait_gone, wait_until
from .test_glasswall_compat import FAKE_EDITOR, FAKE_POLICY

REPO = Path(__file__).resolve().parent.parent
START_METHODS = multiprocessing.get_all_start_methods()


def results_of(pm: ProcessManager) -> list[Any]:
    assert all(r.success for r in pm.task_results), pm.task_results
    return [r.result for r in pm.task_results]


# --- point 1: 0 means "no limit"; an integral float is a worker count ------------------------


def test_zero_means_no_limit_and_is_reported_as_given(backend: str) -> None:
    pm = ProcessManager(0, 0, 0, backend=backend)
    assert pm.max_workers == available_cpus()
    # Nothing enforced but sandboxrun's default process limit (max_processes=0: none at all).
    assert pm.limits == Limits(max_processes=DEFAULT_MAX_PROCESSES)
    assert ProcessManager(0, 0, 0, backend=backend, max_processes=0).limits == Limits()
    with pm:
        pm.queue_task(Task(tasks.sleep_then, (0.2, "slept")))
        pm.queue_task(Task(tasks.touch_and_return, (64,)))  # a 0-byte limit would kill this
    assert sorted(map(str, results_of(pm))) == sorted(["slept", str(64 * 1024**2)])
    for result in pm.task_results:
        # As Glasswall reports them: what was passed, not None.
        assert result.timeout_seconds == 0 and result.memory_limit_in_gib == 0
        assert not result.timed_out and not result.out_of_memory
        assert result.max_memory_used_in_gib is not None  # measured all the same
    assert not leftover_cgroups()


def test_max_workers_may_be_an_integral_float(tmp_path: Path) -> None:
    pm = ProcessManager(max_workers=2.0, backend="psutil")
    assert pm.max_workers == 2 and type(pm.max_workers) is int
    with pm:
        for _ in range(4):
            pm.queue_task(Task(tasks.record_interval, (str(tmp_path), 0.3)))
    assert len(pm.task_results) == 4 and all(r.success for r in pm.task_results)
    intervals = [tuple(map(float, p.read_text().split())) for p in tmp_path.iterdir()]
    running = max(sum(s <= t < e for s, e in intervals) for t, _ in intervals)
    assert running == 2  # two at once, never more
    with pytest.raises(TypeError):
        ProcessManager(max_workers=1.5)


# --- point 2: start_tasks() is public -------------------------------------------------------


def test_start_tasks_runs_the_queue_without_a_with_block(backend: str) -> None:
    pm = ProcessManager(2, backend=backend)
    pm.queue_task(Task(tasks.double, (2,)))
    pm.queue_task(Task(tasks.double, (3,)))
    assert pm.task_results == []  # queueing runs nothing
    pm.start_tasks()
    assert sorted(results_of(pm)) == [4, 6]
    assert not leftover_cgroups()  # the backend is closed again after the run


# --- point 3: a manager can be run again ------------------------------------------------------


def test_second_with_block_and_start_tasks_run_new_tasks_and_results_accumulate(
    backend: str,
) -> None:
    pm = ProcessManager(2, backend=backend)
    with pm:
        pm.queue_task(Task(tasks.double, (1,)))
    assert results_of(pm) == [2]
    assert not leftover_cgroups()
    with pm:
        pm.queue_task(Task(tasks.double, (2,)))
        pm.queue_task(Task(tasks.double, (3,)))
    got = results_of(pm)
    assert got[0] == 2 and sorted(got[1:]) == [4, 6]
    pm.queue_task(Task(tasks.double, (4,)))
    pm.start_tasks()
    assert results_of(pm)[3:] == [8]
    with pm:  # nothing queued: nothing runs, nothing is lost
        pass
    assert len(pm.task_results) == 4
    assert not leftover_cgroups()


def test_as_completed_on_a_reused_manager_yields_only_the_new_results() -> None:
    pm = ProcessManager(1, backend="psutil")
    with pm:
        pm.queue_task(Task(tasks.double, (1,)))
    with pm:
        pm.queue_task(Task(tasks.double, (5,)))
        assert [r.result for r in pm.as_completed()] == [10]
    assert results_of(pm) == [2]


# --- point 4: an exception in the with-body ---------------------------------------------------


def test_exception_in_body_finishes_the_queued_work_then_propagates(
    backend: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    pm = ProcessManager(1, backend=backend)
    with pytest.raises(ValueError, match="the body's own"), pm:
        pm.queue_task(Task(tasks.double, (1,)))
        pm.queue_task(Task(tasks.touch_after, (str(marker), 0.2)))
        raise ValueError("the body's own")
    assert marker.read_text() == "ran"
    assert sorted(map(str, results_of(pm))) == ["2", "None"]
    assert not leftover_cgroups()
    pm.queue_task(Task(tasks.double, (3,)))  # and the manager is still usable
    pm.start_tasks()
    assert results_of(pm)[-1] == 6


def test_exception_inside_as_completed_finishes_the_rest_into_task_results() -> None:
    seen: list[TaskResult] = []
    with pytest.raises(KeyError), ProcessManager(1, backend="psutil") as pm:
        for value in range(4):
            pm.queue_task(Task(tasks.double, (value,)))
        for result in pm.as_completed():
            seen.append(result)
            raise KeyError("after the first result")
    assert len(seen) == 1 and seen[0].success
    assert sorted([seen[0].result, *results_of(pm)]) == [0, 2, 4, 6]


class _Shutdown(BaseException):
    """A non-Exception of the program's own (like SystemExit): must stop the manager too."""


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, _Shutdown])
def test_non_exception_in_body_kills_and_drops(stop: type[BaseException], tmp_path: Path) -> None:
    pid_file, marker = tmp_path / "pid", tmp_path / "ran"
    started = time.monotonic()
    with pytest.raises(stop), ProcessManager(2, backend="psutil") as pm:
        pm.queue_task(Task(tasks.identity, (1,)))
        pm.queue_task(Task(tasks.ignore_sigterm_and_sleep, (str(pid_file), 60)))
        pm.queue_task(Task(tasks.touch_after, (str(marker), 0)))
        for _ in pm.as_completed():
            assert wait_until(pid_file.exists, 10)
            raise stop()
    assert time.monotonic() - started < 30  # not the sleeper's 60 s
    assert wait_gone(tasks.read_pid(pid_file))
    assert not marker.exists() and pm.task_results == []
    with pytest.raises(RuntimeError, match=f"aborted ProcessManager: a {stop.__name__}"):
        pm.queue_task(Task(tasks.double, (1,)))
    with pytest.raises(RuntimeError, match="aborted"):
        pm.start_tasks()


CTRL_C = """
import sys
from sandboxrun import ProcessManager, Task
from tests import tasks

pid_file, marker, backend = sys.argv[1:4]
with ProcessManager(1, backend=backend) as pm:
    pm.queue_task(Task(tasks.ignore_sigterm_and_sleep, (pid_file, 60)))
    pm.queue_task(Task(tasks.touch_after, (marker, 0)))
    raise ValueError("the body's own")  # so the exit waits for the queued work...
"""


def test_ctrl_c_while_the_exit_finishes_the_work_stops_at_once(
    backend: str, tmp_path: Path
) -> None:
    # ...and Ctrl-C during that wait must still stop everything. The manager runs in a
    # subprocess: the signal goes to it alone.
    pid_file, marker = tmp_path / "pid", tmp_path / "ran"
    args = [sys.executable, "-c", CTRL_C, str(pid_file), str(marker), backend]
    child = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(pid_file.exists, 20), "the sleeper never started"
        os.kill(child.pid, signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        child.kill()
        child.wait()
    assert child.returncode != 0
    assert "KeyboardInterrupt" in stderr and "ValueError: the body's own" in stderr, stderr
    assert wait_gone(tasks.read_pid(pid_file))
    assert not marker.exists()


# --- point 7: exit codes are multiprocessing.Process.exitcode ---------------------------------


def _returns() -> str:
    return "fine"


def _raises_value_error() -> NoReturn:
    raise ValueError("an Exception: caught, as Glasswall's worker does")


def _raises_keyboard_interrupt() -> NoReturn:
    raise KeyboardInterrupt


def _raises_own_base_exception() -> NoReturn:
    raise _Shutdown


def _exits_none() -> NoReturn:
    sys.exit()


def _exits_3() -> NoReturn:
    sys.exit(3)


def _exits_text() -> NoReturn:
    sys.exit("a message, not a code")


def _glasswall_shaped_target(func: Any) -> None:
    # What Glasswall's worker does with the task: an Exception is caught and reported, anything
    # else escapes the Process target.
    with contextlib.suppress(Exception):
        func()


def _reference_exitcode(func: Any) -> int | None:
    process = multiprocessing.Process(target=_glasswall_shaped_target, args=(func,))
    process.start()
    process.join(30)
    return process.exitcode


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (_returns, 0),
        (_raises_value_error, 0),
        (_raises_keyboard_interrupt, 1),
        (_raises_own_base_exception, 1),
        (_exits_none, 0),
        (_exits_3, 3),
        (_exits_text, 1),
    ],
)
def test_exit_code_is_multiprocessing_process_exitcode(func: Any, expected: int) -> None:
    assert _reference_exitcode(func) == expected  # the rule itself, checked live
    with ProcessManager(1, backend="psutil") as pm:
        pm.queue_task(Task(func))
    (result,) = pm.task_results
    assert result.exit_code == expected
    if func is _raises_keyboard_interrupt:  # still reported, unlike Glasswall's exception=None
        assert not result.success and isinstance(result.exception, KeyboardInterrupt)


# --- the seed's three examples, as written, under every start method --------------------------

# The seed (the Glasswall manager's documentation, shared/ beside the checkout, as CI has it):
# its three examples are read from there, not copied into the project.
SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "001_fe013f6bb898ef74.txt"


def seed_examples() -> list[str]:
    """The seed's three examples (``import os`` to ``main()``), imports switched to sandboxrun."""
    lines = [line.removeprefix("    ") for line in SEED.read_text().splitlines()]
    examples: list[str] = []
    current: list[str] | None = None
    for line in lines:
        if current is None and line == "import os":
            current = []
        if current is not None:
            current.append(line)
            if line == "    main()" and current[-2] == 'if __name__ == "__main__":':
                text = "\n".join(current) + "\n"
                old, new = "from glasswall.multiprocessing", "from sandboxrun.multiprocessing"
                examples.append(text.replace(old, new))
                current = None
    return examples

# A stand-in for the glasswall package: just what the examples touch. The engine reads
# input_file and writes output_file (or returns the bytes); it refuses a policy that did not
# arrive as its XML text, which is what sandboxrun's Task must turn it into.
FAKE_GLASSWALL = {
    "glasswall/__init__.py": "from . import config, content_management, utils\n"
    "from ._editor import Editor\n",
    "glasswall/config/__init__.py": "from . import logging\n",
    "glasswall/config/logging.py": "import logging\n"
    "log = logging.getLogger('glasswall')\n"
    "console = logging.StreamHandler()\n"
    "log.addHandler(console)\n",
    "glasswall/content_management/__init__.py": "from . import policies\n",
    # The policies as in test_glasswall_compat (the real package layout: policy.py, editor.py).
    "glasswall/content_management/policies/__init__.py": "from .editor import Editor\n"
    "from .policy import Policy\n",
    "glasswall/content_management/policies/policy.py": FAKE_POLICY,
    "glasswall/content_management/policies/editor.py": FAKE_EDITOR,
    "glasswall/utils.py": """
import os


def list_file_paths(directory):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(directory)
                  for name in names)
""",
    "glasswall/_editor.py": """
import os


class Editor:
    def __init__(self, library_path):
        self.library_path = library_path

    def export_file(self, input_file, output_file=None, content_management_policy=None):
        if content_management_policy is not None and not (  # None: the engine's default
                isinstance(content_management_policy, str)
                and "sanitise" in content_management_policy):
            raise TypeError("policy not passed as its text: %r" % (content_management_policy,))
        with open(input_file, "rb") as file:
            exported = b"PK\\x03\\x04" + file.read()
        if output_file is None:
            return exported
        os.makedirs(os.path.dirname(output_file), exist_ok=True)
        with open(output_file, "wb") as file:
            file.write(exported)
        return None
""",
}
FAKE_TQDM = "def tqdm(iterable=None, **kwargs):\n    return iterable\n"

# The examples' own (Windows) paths, which on Linux are single relative names in the cwd.
INPUTS = {"TestFile_11.doc": 1111, "TestFile_9.doc": 99, "PDFWithGifAndJpeg.pdf": 5000}
INPUT_DIRECTORY = r"C:\gwpw\input"
OUTPUT_DIRECTORY = r"C:\gwpw\output\editor\multiprocessing"

SEED_FIELDS = ("success=True", "exception=None", "exit_code=0", "timeout_seconds=5",
               "memory_limit_in_gib=4", "timed_out=False", "out_of_memory=False")  # fmt: skip

RUN_EXAMPLES = """
import multiprocessing, runpy, sys
multiprocessing.set_start_method(sys.argv[1])
for path in sys.argv[2:]:
    print("=== " + path, flush=True)
    runpy.run_path(path, run_name="__main__")
"""


def site_of(directory: Path) -> Path:
    """Where the stand-in package goes: beside the examples' folder, not in it. The real one
    lives in site-packages; a working folder on ``sys.path`` is never handed to a task."""
    return directory.with_name(directory.name + "-site")


def write_fake_glasswall(directory: Path) -> None:
    """The stand-in glasswall package (and tqdm if missing) in ``site_of(directory)``, and the
    examples' input files in ``directory``."""
    site = site_of(directory)
    for name, text in FAKE_GLASSWALL.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if importlib.util.find_spec("tqdm") is None:
        (site / "tqdm.py").write_text(FAKE_TQDM)
    (directory / INPUT_DIRECTORY).mkdir()
    for name, size in INPUTS.items():
        (directory / INPUT_DIRECTORY / name).write_bytes(b"d" * size)


def run_seed_examples(directory: Path, method: str) -> str:
    """Run the three examples in a fresh interpreter under ``method``; its stdout."""
    scripts = []
    for index, example in enumerate(seed_examples(), 1):
        script = site_of(directory) / f"seed_example_{index}.py"
        script.write_text(example)
        scripts.append(str(script))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site_of(directory)), str(REPO)]))
    run = subprocess.run(
        [sys.executable, "-c", RUN_EXAMPLES, method, *scripts],
        cwd=directory, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def check_seed_output(stdout: str, directory: Path) -> None:
    sections = stdout.split("=== ")[1:]
    assert len(sections) == 3, stdout
    for section in sections:
        lines = [line for line in section.splitlines() if line.startswith("TaskResult(")]
        assert len(lines) == len(INPUTS), section
        for line in lines:
            assert line.startswith(
                r"TaskResult(task=Task(func=worker_function, args=(), kwargs=(input_file='C:\\gwpw"
            )
            for field in SEED_FIELDS:
                assert f", {field}," in line or line.endswith(f", {field})"), (field, line)
    sizes = re.findall(r"Export zip file size is: (\d+) bytes for input_file: '(.+)'", sections[2])
    assert sorted((int(size), os.path.basename(path)) for size, path in sizes) == sorted(
        (size + 4, name) for name, size in INPUTS.items()
    )
    for name, size in INPUTS.items():
        exported = (directory / OUTPUT_DIRECTORY / f"{name}.zip").read_bytes()
        assert exported == b"PK\x03\x04" + b"d" * size


@pytest.mark.timeout(90)
def test_seed_examples_run_as_written_under_every_start_method(tmp_path: Path) -> None:
    if not SEED.exists():
        pytest.skip(f"the seed is not beside this checkout ({SEED})")
    assert len(seed_examples()) == 3
    for method in START_METHODS:
        directory = tmp_path / method
        directory.mkdir()
        write_fake_glasswall(directory)
        check_seed_output(run_seed_examples(directory, method), directory)
