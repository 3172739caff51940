"""The manager's check of a zygote's STARTED answer: the pidfd is of the pid it names, a child
of that zygote (read from /proc, raw)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"), reason="pidfds"
)


def test_the_pidfd_and_the_parent_are_checked() -> None:
    from sandboxrun._zygote import client

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert client._pidfd_pid(pidfd) == child.pid
        assert client._parent_of(child.pid) == os.getpid()
        assert client._is_our_child(pidfd, child.pid, os.getpid())
        assert not client._is_our_child(pidfd, child.pid, os.getppid())  # another "zygote"
        assert not client._is_our_child(pidfd, child.pid + 1, os.getpid())  # another pid
        read_end, write_end = os.pipe()
        assert client._pidfd_pid(read_end) is None  # not a pidfd
        os.close(read_end)
        os.close(write_end)
    finally:
        child.kill()
        child.wait()
    assert client._pidfd_pid(pidfd) == -1  # reaped
    assert client._is_our_child(pidfd, child.pid, os.getpid())  # ended before we looked: fine
    os.close(pidfd)
