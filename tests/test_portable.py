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
