"""One task's cgroup v2 directories and the one reader of their kernel counters.

Both the cgroup v2 sandbox (``members`` = ``counters`` = ``task-<n>``) and the systemd task
scope (``members`` = ``<scope>/task``, ``counters`` = ``<scope>``) are a ``TaskCgroup``::

    kill()    -> cgroup.kill (5.14+) or freeze / SIGKILL / thaw    on members
    collect() -> wait for populated 0, then read                   on counters:
                 memory.peak (5.19+; else the sampled memory.current), memory.events oom_kill
                 and oom_group_kill, pids.events max, cpu.stat usage_usec (and nr_throttled,
                 throttled_usec where the cpu controller is enabled)
    cpu_time_seconds() -> cpu.stat usage_usec                      on counters, while it runs
    remove_members() -> rmdir members (kill again when it is still populated)
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import platform
from collections.abc import Mapping
from pathlib import Path

from ... import _limits
from .. import cgroupfs, hosts
from ..base import Usage
from .place import Place
from .runner import EMPTY_TIMEOUT, kill_all, wait_empty

log = cgroupfs.log
PROBED_FILES = ("memory.peak", "cgroup.kill", "memory.oom.group", "memory.swap.max", "cpu.max")
PEAK_SAMPLE_SECONDS = 0.05
# cpu.stat usage_usec is in every non-root cgroup, cpu controller or not ("cpu_time"); the
# quota (cpu.max) needs the cpu controller, so "cpu_quota" is added where it is (enforced()).
KERNEL_ENFORCED = frozenset(
    {"memory", "processes", "tree_kill", "peak_memory", "oom_detection", "cpu_time"}
)


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    try:
        text = (release or platform.release()).split("-")[0]
        found = tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def probe_files(place: Place, below: Path | None) -> dict[str, bool]:
    """Which optional kernel files a task cgroup will have (``below``: its parent, if made)."""
    for probe in (below, place.root):
        # A non-root cgroup shows memory.* files iff its parent enables memory for it.
        if probe is not None and probe != place.mount and (probe / "memory.max").is_file():
            return {name: (probe / name).is_file() for name in PROBED_FILES}
    # Nothing to look at before open(): go by the version each file appeared in.
    return {
        "memory.peak": kernel_at_least(5, 19),
        "cgroup.kill": kernel_at_least(5, 14),
        "memory.oom.group": kernel_at_least(4, 19),
        "memory.swap.max": (place.root / "memory.swap.max").is_file() or kernel_at_least(4, 18),
        "cpu.max": "cpu" in hosts.controllers(place.root),
    }


def enforced(files: Mapping[str, bool]) -> frozenset[str]:
    """What the kernel keeps with these files: no memory.peak means a sampled peak, no
    cpu.max no quota."""
    found = KERNEL_ENFORCED if files["memory.peak"] else KERNEL_ENFORCED - {"peak_memory"}
    return (found | {"cpu_quota"}) if files.get("cpu.max") else found


def write_cpu_max(path: Path, quota: float) -> None:
    """``cpu.max`` = "<quota * period> <period>": ``quota`` CPUs over the whole subtree."""
    period = _limits.CPU_PERIOD_USEC
    cgroupfs.write(path / "cpu.max", f"{round(quota * period)} {period}")


def cpu_time_seconds(counters: Path) -> float | None:
    usage = cgroupfs.read_keyed(counters / "cpu.stat").get("usage_usec")
    return None if usage is None else usage / 1e6


def peak_source(files: Mapping[str, bool]) -> str:
    if files["memory.peak"]:
        return "memory.peak"
    return f"memory.current every {PEAK_SAMPLE_SECONDS}s (degraded: no memory.peak)"


def read_usage(counters: Path, sampled_peak: int | None) -> Usage:
    """The final counters of a fresh (per-task) cgroup: plain counts, no deltas.

    ``sampled_peak``: ``None`` to read ``memory.peak``, else the peak sampled from
    ``memory.current`` (kernels before 5.19). A file that cannot be read gives ``None``, not 0.
    """
    peak = cgroupfs.read_int(counters / "memory.peak") if sampled_peak is None else sampled_peak
    events = cgroupfs.read_keyed(counters / "memory.events")
    cpu_stat = cgroupfs.read_keyed(counters / "cpu.stat")
    cpu, throttled = cpu_stat.get("usage_usec"), cpu_stat.get("throttled_usec")
    if peak is None or not events:
        log.warning(
            "cannot read the counters of %s (peak %s, memory.events %s): the result lacks them",
            counters,
            peak,
            events or "unreadable",
        )
    return Usage(
        peak_memory_bytes=peak,
        # oom_kill may count 2 for one OOM under memory.oom.group (the victim, then the group).
        oom_killed=events.get("oom_kill", 0) > 0 or events.get("oom_group_kill", 0) > 0,
        memory_limit_hit=events.get("max", 0) > 0 or events.get("oom", 0) > 0,
        process_limit_hit=cgroupfs.read_keyed(counters / "pids.events").get("max", 0) > 0,
        cpu_time_seconds=None if cpu is None else cpu / 1e6,
        cpu_throttled_periods=cpu_stat.get("nr_throttled"),
        cpu_throttled_seconds=None if throttled is None else throttled / 1e6,
    )


class TaskCgroup:
    """Kill, collect and remove one task's processes; read its counters (see the module doc)."""

    def __init__(self, members: Path, counters: Path, files: Mapping[str, bool]) -> None:
        self.members = members
        self.counters = counters
        self.files = files
        self.peak_sampled = 0

    @property
    def samples_peak(self) -> bool:
        """No memory.peak: the owner must call ``sample()`` every PEAK_SAMPLE_SECONDS."""
        return not self.files["memory.peak"]

    def sample(self) -> None:
        current = cgroupfs.read_int(self.counters / "memory.current")
        self.peak_sampled = max(self.peak_sampled, current or 0)

    def kill(self) -> None:
        kill_all(self.members, self.files["cgroup.kill"])

    def cpu_time_seconds(self) -> float | None:
        return cpu_time_seconds(self.counters)

    def collect(self) -> Usage:
        if cgroupfs.pids(self.members):
            self.kill()
        if not wait_empty(self.members, EMPTY_TIMEOUT):
            log.warning(
                "%s still holds processes %ss after the kill: the counters may still grow",
                self.members,
                EMPTY_TIMEOUT,
            )
        if self.samples_peak:
            self.sample()
        return read_usage(self.counters, self.peak_sampled if self.samples_peak else None)

    def remove_members(self) -> bool:
        """rmdir ``members``; ``False`` when it stays (a process stuck in D state)."""
        # remove_tree: a task may have made sub-cgroups of its own, which must go first
        # (cgroup.kill already killed their processes).
        try:
            cgroupfs.remove_tree(self.members)
            return True
        except OSError as error:
            first = error
        kill_all(self.members, self.files["cgroup.kill"])
        if wait_empty(self.members, EMPTY_TIMEOUT):
            try:
                cgroupfs.remove_tree(self.members)
                return True
            except OSError as error:
                first = error
        cgroupfs.LEFTOVERS.defer(self.members, first)  # retried off the hot path, never raised
        return False
