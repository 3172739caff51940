"""The shape of Glasswall's own integration run, under the default profile with the zygote.

Glasswall's CI drives its process manager the way its users do, and the pieces it leans on are
what this module checks, in its own words (issue 23's done-criterion):

- the worker is configured only through environment variables, set in the manager before the
  ``ProcessManager`` is built, and read by the task function at call time (the engine's name,
  its function, its library folder);
- uploads sit in a fresh ``tempfile.mkdtemp()`` folder (0700, files 0600) in subfolders; outputs
  go beside them, or to an output folder made beforehand under the same root, whose subfolders
  the task creates;
- many tasks, some of which the engine refuses: a mix of successes and failures;
- results are read from ``as_completed()`` inside the block and from ``task_results`` after it;
- returned values: ``None`` (file to file), ``bytes`` (file to memory), ``Path``, ``datetime``.

The checks on each ``TaskResult`` are the ones Glasswall's run and README examples make: the
result is truthy (``str(r.exception) if r else None``), ``success`` is the ``True``/``False``
singleton (compared with ``is``), ``str(exception)`` is counted per message, not every task
failed, ``vars(result)`` (``__dict__``) carries the documented fields, ``as_completed()`` yields
one result per queued task, ``result.task.kwargs["input_file"]`` names the upload, and a
file-to-memory result is truthy with a ``len``.
"""

from __future__ import annotations

import collections
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxrun import ProcessManager, Task, TaskResult
from sandboxrun._launch import ZYGOTE_AVAILABLE

pytestmark = [
    pytest.mark.skipif(not ZYGOTE_AVAILABLE, reason="isolation needs the zygote (Linux, pidfds)"),
    pytest.mark.skipif(
        sys.platform.startswith("linux") and os.geteuid() != 0,
        reason="a non-root manager's tasks keep its uid (nothing to hand over)",
    ),
]

#: What Glasswall documents on a TaskResult (its README's field list); vars() must hold them.
GLASSWALL_FIELDS = {
    "task", "success", "result", "exception", "exit_code", "timeout_seconds",
    "memory_limit_in_gib", "start_time", "end_time", "elapsed_time", "timed_out",
    "max_memory_used_in_gib", "out_of_memory",
}  # fmt: skip
ZIP_MAGIC = b"PK\x03\x04"
REFUSED = b"BAD"  # the stand-in engine refuses an upload that starts with this


class UnsupportedFile(Exception):
    """The stand-in engine's refusal (Glasswall raises its own error classes)."""


# --- the stand-in engine and the environment-configured worker --------------------------------


class StandInEditor:
    """Just what the worker needs of an engine: a library folder it reads on load, and an
    export that reads the upload and writes (or returns) the zip, making missing folders."""

    def __init__(self, library_path: str) -> None:
        if not os.path.isdir(library_path):
            raise NotADirectoryError(library_path)
        with open(os.path.join(library_path, "__init__.py"), "rb"):  # "loading the library"
            pass
        self.library_path = library_path

    def export_file(self, input_file: str, output_file: str | None = None) -> bytes | None:
        if not os.path.isfile(input_file):
            raise FileNotFoundError(input_file)
        with open(input_file, "rb") as source:
            data = source.read()
        if data.startswith(REFUSED):
            raise UnsupportedFile(input_file)
        exported = ZIP_MAGIC + data
        if output_file is None:
            return exported
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "wb") as target:
            target.write(exported)
        return None


def worker(*args: Any, **kwargs: Any) -> Any:
    """Configured by the manager's environment alone, as Glasswall's CI worker is; what it
    returns depends on the call's shape (``returns``: how to report a file-to-file export)."""
    engine = globals()[os.environ["SHAPE_ENGINE_NAME"]](os.environ["SHAPE_LIBRARY_PATH"])
    export = getattr(engine, os.environ["SHAPE_FUNCTION_NAME"])
    returns = kwargs.pop("returns", None)
    exported = export(*args, **kwargs)
    output_file = kwargs.get("output_file")
    if returns == "path":
        return Path(output_file)
    if returns == "mtime":
        return datetime.datetime.fromtimestamp(os.stat(output_file).st_mtime)
    return exported  # None for file to file, the zip's bytes for file to memory


# --- the job: a mkdtemp() root, uploads in subfolders, an output folder beside them ------------


@pytest.fixture(params=[0o700, 0o711], ids=["mkdtemp-0700", "root-traversable-0711"])
def job_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh mkdtemp() folder under /tmp, as users make it (0700: the task reaches what it was
    handed below it through a cover holding only the way down); the 0711 case is the same job
    with the root traversable by others."""
    root = Path(tempfile.mkdtemp(prefix="sandboxrun-gwshape-", dir="/tmp"))
    assert root.stat().st_mode & 0o777 == 0o700
    root.chmod(request.param)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def make_uploads(root: Path) -> dict[str, bytes]:
    """34 uploads (0600) in three levels of subfolders, every ninth refused by the engine."""
    names = [f"top_{i:02}.doc" for i in range(12)]
    names += [f"docs/d_{i:02}.pdf" for i in range(12)]
    names += [f"docs/deep/x/e_{i:02}.xls" for i in range(10)]
    uploads = {}
    for number, name in enumerate(names):
        path = root / "input" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (REFUSED if number % 9 == 4 else b"doc") + name.encode() * (number + 1)
        path.write_bytes(data)
        path.chmod(0o600)
        uploads[str(path)] = data
    return uploads


def queue_job(pm: ProcessManager, root: Path, uploads: dict[str, bytes]) -> dict[str, dict]:
    """One task per upload, kwargs only (args=None), cycling through the four output shapes."""
    shapes = ["separate", "beside", "memory", "separate-mtime"]
    queued = {}
    for number, input_file in enumerate(uploads):
        shape = shapes[number % len(shapes)]
        kwargs: dict[str, Any] = {"input_file": input_file}
        relative = os.path.relpath(input_file, root / "input")
        if shape == "separate":
            kwargs["output_file"] = os.path.normpath(os.path.join(root, "output", relative))
        elif shape == "separate-mtime":
            kwargs["output_file"] = str(root / "output" / (relative + ".zip"))
            kwargs["returns"] = "mtime"
        elif shape == "beside":
            kwargs["output_file"] = input_file + ".zip"
            kwargs["returns"] = "path"
        pm.queue_task(Task(func=worker, args=None, kwargs=kwargs))
        queued[input_file] = {"shape": shape, "output_file": kwargs.get("output_file")}
    return queued


def check_result(result: TaskResult, queued: dict[str, dict], uploads: dict[str, bytes]) -> None:
    assert result  # Glasswall's run counts str(r.exception) if r else None
    assert result.success is True or result.success is False
    assert set(vars(result)) >= GLASSWALL_FIELDS, set(vars(result))
    assert result.isolation.startswith("default"), result.isolation
    input_file = result.task.kwargs["input_file"]
    data, job = uploads[input_file], queued[input_file]
    if data.startswith(REFUSED):
        assert result.success is False and isinstance(result.exception, UnsupportedFile)
        assert str(result.exception) == input_file
        assert result.exit_code == 0 and not result.timed_out and not result.out_of_memory
        return
    assert result.success is True, (input_file, repr(result.exception))
    assert result.exception is None and result.exit_code == 0
    exported = ZIP_MAGIC + data
    if job["shape"] == "memory":
        assert type(result.result) is bytes and result.result == exported
        assert result.result and len(result.result) == len(exported)  # README example 3
        return
    output = Path(job["output_file"])
    assert output.read_bytes() == exported
    assert output.stat().st_uid == os.geteuid()  # landed as the manager's
    if job["shape"] == "beside":
        assert result.result == output and isinstance(result.result, Path)
    elif job["shape"] == "separate-mtime":
        assert type(result.result) is datetime.datetime
        assert result.result == datetime.datetime.fromtimestamp(output.stat().st_mtime)
    else:
        assert result.result is None


def configure_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the manager exists, as Glasswall's CI sets os.environ in its __main__."""
    monkeypatch.setenv("SHAPE_ENGINE_NAME", "StandInEditor")
    monkeypatch.setenv("SHAPE_FUNCTION_NAME", "export_file")
    # The engine's library folder, named only here: readable as any local user reads an
    # installed library (this test's own package folder stands in for it).
    monkeypatch.setenv("SHAPE_LIBRARY_PATH", str(Path(__file__).resolve().parent))


@pytest.mark.timeout(240)
def test_integration_shaped_run_as_completed(
    job_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_worker(monkeypatch)
    uploads = make_uploads(job_root)
    (job_root / "output").mkdir()  # made beforehand, its subfolders by the tasks
    seen: list[TaskResult] = []
    with ProcessManager(
        max_workers=2, worker_timeout_seconds=60, memory_limit_in_gib=2
    ) as pm:  # the zygote and the default profile: nothing chosen
        queued = queue_job(pm, job_root, uploads)
        for result in pm.as_completed():
            seen.append(result)
    assert len(seen) == len(uploads) == 34
    assert sorted(r.task.kwargs["input_file"] for r in seen) == sorted(uploads)
    for result in seen:
        check_result(result, queued, uploads)
    messages = collections.Counter(str(r.exception) if r else None for r in seen)
    refused = [name for name, data in uploads.items() if data.startswith(REFUSED)]
    assert messages == collections.Counter({"None": 34 - len(refused), **dict.fromkeys(refused, 1)})
    assert len([r for r in seen if r.success is True]) == 30
    assert len([r for r in seen if r.success is False]) == 4
    assert not all(r.success is False for r in seen)


@pytest.mark.timeout(240)
def test_integration_shaped_run_task_results(
    job_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README example 1's shape: nothing read inside the block, task_results filled at its end;
    # here the output folder does not exist yet, so the first tasks create it.
    configure_worker(monkeypatch)
    uploads = make_uploads(job_root)
    with ProcessManager(max_workers=2, worker_timeout_seconds=60, memory_limit_in_gib=2) as pm:
        queued = queue_job(pm, job_root, uploads)
    assert len(pm.task_results) == 34
    for result in pm.task_results:
        check_result(result, queued, uploads)
        assert repr(result).startswith("TaskResult(task=Task(func=worker, args=(), kwargs=(")
    assert sum(r.success is True for r in pm.task_results) == 30
