"""The cgroup v2 backend (``backend.py``) and the parts the systemd backend shares: where to
live (``place.py``), the runner cgroup (``runner.py``), a task's cgroup and its counters
(``counters.py``)."""

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

from .backend import CgroupV2Backend, CgroupV2Sandbox, RunnerSession

__all__ = ["CgroupV2Backend", "CgroupV2Sandbox", "RunnerSession"]
