from __future__ import annotations

import os
import time

import psutil
import pytest

from sandboxrun import detect

#: Wall-clock limits in tests are multiplied by this (the TCG guest is 20-35x slower).
SCALE = float(os.environ.get("SANDBOXRUN_TIME_SCALE", "1"))

REPORT = detect()
AVAILABLE = [name for name, entry in REPORT["backends"].items() if entry["available"]]
KERNEL_BACKENDS = [name for name in AVAILABLE if name != "psutil"]


def pytest_report_header(config):
    return f"sandboxrun: auto picks {REPORT['chosen']}; available: {', '.join(AVAILABLE)}"


@pytest.fixture(params=AVAILABLE)
def backend(request):
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS or [pytest.param("none", marks=pytest.mark.skip)])
def kernel_backend(request):
    return request.param


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds * SCALE
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.01)
    return gone(pid)


def leftover_cgroups() -> list[str]:
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        for name in dirs:
            if name.startswith(f"sandboxrun-{os.getpid()}-"):
                found.append(os.path.join(root, name))
        if root.count(os.sep) > 8:
            dirs.clear()
    return found
