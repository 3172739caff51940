"""The portable pieces Windows and macOS run, checked here on Linux (docs/backends.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sandboxrun._backends.psutil_monitor import PsutilSandbox
from sandboxrun._limits import Limits
from sandboxrun._reasons import KillReason

from .conftest import wait_gone


@pytest.mark.parametrize(("value", "name"), [("portable", "portable"), ("", "posix")])
def test_the_transport_is_chosen_once_by_the_environment(value: str, name: str) -> None:
    env = {**os.environ, "SANDBOXRUN_TRANSPORT": value}
    code = "import sandboxrun, sandboxrun._transport as t; print(t.NAME, t.DEFAULT_START_METHOD)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()  # fmt: skip
    assert out[0] == name
    assert out[1] == ("spawn" if name == "portable" else "None")


def test_psutil_monitor_polls_the_cpu_time_limit() -> None:
    # Where there is no RLIMIT_CPU (Windows) the poll is the CPU-time limit: a spinning process
    # (no rlimit set on it) is reported once its CPU time passes the allowance, not before.
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sandbox = PsutilSandbox(Limits(cpu_time_seconds=0.3), 0.05)
        sandbox.attach(spinner.pid)
        assert sandbox.poll() is None  # just started: well under 0.3 s
        deadline = time.monotonic() + 30
        reason = None
        while reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
            reason = sandbox.poll()
        assert reason == KillReason.CPU_TIME
        assert sum(sandbox.cpu_seconds.values()) > 0.3
        sandbox.kill()
        assert wait_gone(spinner.pid)
    finally:
        spinner.kill()
        spinner.wait(10)


def test_portable_reader_buffers_no_more_than_the_longest_frame() -> None:
    """A worker that floods its result Connection is cut off at max_bytes + the frame overhead:
    the drain thread stops, closes the pipe (the writer gets EPIPE, it does not block)."""
    import multiprocessing
    import threading

    from sandboxrun._transport import _portable

    reader, writer = multiprocessing.Pipe(duplex=False)
    result = _portable._Result(reader, max_bytes=2 << 20)
    refused: list[BaseException] = []

    def flood() -> None:
        try:
            for _ in range(64):  # 64 MiB offered
                writer.send_bytes(b"x" * (1 << 20))
        except OSError as error:  # EPIPE once the reader gave up
            refused.append(error)

    sender = threading.Thread(target=flood)
    sender.start()
    sender.join(20)
    result.thread.join(20)
    buffered = sum(len(chunk) for chunk in result.chunks)
    assert not sender.is_alive() and refused, "the flooding writer was not cut off"
    assert buffered <= (2 << 20) + _portable._FRAME_OVERHEAD


@pytest.mark.parametrize("start_method", ["zygote", "fork"])
def test_psutil_adds_rlimit_nproc_only_for_a_task_of_its_own_uid(start_method: str) -> None:
    # The polled count can be outrun between two polls; RLIMIT_NPROC cannot. It counts every
    # process of the uid, so only a task with a uid of its own (a profile, root manager) gets
    # it: one over the limit, so that the poll still sees the tree over it and says so.
    from sandboxrun import ProcessManager, Task
    from sandboxrun._isolation import STRICT, unavailable_reason
    from sandboxrun._launch import ZYGOTE_AVAILABLE
    from sandboxrun._limits import DEFAULT_MAX_PROCESSES

    from . import tasks

    if start_method == "zygote" and not ZYGOTE_AVAILABLE:
        pytest.skip("no zygote launcher here")
    own = tasks.nproc_limit()
    found = {}
    profiles = ["default", "strict"] if start_method == "zygote" else []  # only the zygote's
    isolations = ["none"] + ([] if unavailable_reason(STRICT) or os.geteuid() else profiles)
    for backend in ("psutil", "auto"):
        for isolation in isolations:
            with ProcessManager(1, 60, backend=backend, start_method=start_method,  # type: ignore[arg-type]
                                isolation=isolation) as pm:  # type: ignore[arg-type]  # fmt: skip
                pm.queue_task(Task(tasks.nproc_limit))
            result = pm.task_results[0]
            assert result.success, result
            found[pm.backend.name, isolation] = tuple(result.result)
    for (backend, isolation), limit in found.items():
        rlimited = backend == "psutil" and isolation != "none"
        wanted = (DEFAULT_MAX_PROCESSES + 1, DEFAULT_MAX_PROCESSES + 1) if rlimited else own
        assert limit == wanted, (backend, isolation, limit)
    if "strict" not in isolations:
        pytest.skip("no strict isolation here: only the unchanged limits were checked")
