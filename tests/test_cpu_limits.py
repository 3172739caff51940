"""CPU limits that hold for the whole task tree, and a per-task CPU quota (issue 15).

``cpu_time_limit_seconds`` counts every process of the task (the kernel's cgroup counter, the
polled tree on psutil); ``cpu_quota`` caps how much of the machine a task may use while it runs
(CFS bandwidth control on the kernel backends; refused at construction on psutil). The margins
are generous: the machine has 2 cores and is shared, so a figure is checked against what the
mechanism guarantees plus slack, but every assertion can still fail (the unfixed code used
4.5 s of CPU under a 1 s budget).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandboxrun import BackendUnavailable, CpuTimeLimitExceeded, ProcessManager
from sandboxrun import _outcome as outcome
from sandboxrun._backends.base import Sandbox, Usage
from sandboxrun._cpu_budget import MIN_CHECK_SECONDS, CpuBudget
from sandboxrun._limits import Limits
from sandboxrun._reasons import KillReason
from sandboxrun.cli import app

from . import cpu_tasks, tasks
from .conftest import SCALE, wait_until
from .test_fault_matrix import run_one
from .test_outcome import RETURNED_42, job_with
from .test_outcome import terms as outcome_terms

#: What a task may use beyond its budget before the kill: every core during one check
#: interval (10 ms in the scheduler, 50 ms polled on psutil), the kill itself, and a loaded
#: machine's late wake-ups. Far below the 3.5 s the unfixed code let through.
OVERSHOOT_SECONDS = 0.6
TOLERANCE = 0.2  # the quota test's ±20 %


def test_forking_spinner_is_stopped_at_its_tree_budget(backend: str) -> None:
    """3 children spinning 1.5 s each: every one stays under its own RLIMIT_CPU; the tree's
    4.5 s is what the budget of 1 s must catch."""
    result = run_one(
        backend, cpu_tasks.forking_spinner, 3, 1.5,
        cpu_time_limit_seconds=1, worker_timeout_seconds=30 * SCALE,
    )  # fmt: skip
    assert (result.success, result.cpu_time_limit_exceeded, result.timed_out) == (
        False,
        True,
        False,
    )
    assert isinstance(result.exception, CpuTimeLimitExceeded)
    used = result.cpu_time_used_seconds
    assert used is not None
    assert 0.9 <= used <= 1 + OVERSHOOT_SECONDS, used


def test_a_task_under_its_budget_succeeds(backend: str) -> None:
    result = run_one(
        backend, cpu_tasks.forking_spinner, 2, 0.2,
        cpu_time_limit_seconds=3, worker_timeout_seconds=30 * SCALE,
    )  # fmt: skip
    assert result.success and result.result == 2, result.exception
    assert not result.cpu_time_limit_exceeded
    assert result.cpu_time_used_seconds is not None and result.cpu_time_used_seconds >= 0.35


def test_cpu_quota_caps_the_whole_tree(kernel_backend: str) -> None:
    """0.25 CPU for 2 s of wall time, spun by two processes: about 0.5 s of CPU in all, by the
    kernel's counter (unlimited, the two would use up to 4 s)."""
    result = run_one(
        kernel_backend, cpu_tasks.spin_wall, 2.0, 2,
        cpu_quota=0.25, worker_timeout_seconds=30 * SCALE,
    )  # fmt: skip
    assert result.success, result.exception
    used = result.cpu_time_used_seconds
    assert used is not None
    # The quota is a ceiling, not a guarantee: a loaded machine may give less (slack below).
    # Above: 0.25 CPU per second the task lived (its bootstrap too: seconds under emulation).
    ceiling = 0.25 * max(2.0, result.elapsed_time)
    assert 0.5 * (1 - 1.5 * TOLERANCE) <= used <= ceiling * (1 + TOLERANCE), used
    assert result.cpu_throttled_periods is not None and result.cpu_throttled_periods > 0
    assert result.cpu_throttled_seconds is not None and result.cpu_throttled_seconds > 0.5


_QUOTAD = textwrap.dedent(
    """
    import json, sys
    from sandboxrun import ProcessManager, Task
    from tests import cpu_tasks
    with ProcessManager(1, backend=sys.argv[1], cpu_quota=0.25) as manager:
        manager.queue_task(Task(cpu_tasks.spin_wall, (4.0, 2, sys.argv[2])))
    print(json.dumps(manager.task_results[0].cpu_time_used_seconds))
    """
)


def test_a_neighbour_without_a_quota_is_not_slowed(kernel_backend: str, tmp_path: Path) -> None:
    """While a quota'd task spins 2 processes in another manager, an unlimited neighbour gets
    about a core. A quota written one level too high (the shared parent) would give it at
    most a quarter of one."""
    ready = tmp_path / "ready"
    root = Path(__file__).resolve().parent.parent
    quotad = subprocess.Popen(
        [sys.executable, "-c", _QUOTAD, kernel_backend, str(ready)],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(ready.exists, 30), "the quota'd task never started"
        wall = 1.5
        result = run_one(kernel_backend, cpu_tasks.spin_wall, wall, 1)
        out, _ = quotad.communicate(timeout=60 * SCALE)
    finally:
        if quotad.poll() is None:
            quotad.kill()
            quotad.wait()
    assert result.success, result.exception
    assert result.cpu_time_used_seconds is not None
    assert result.cpu_time_used_seconds >= 0.5 * wall, result.cpu_time_used_seconds
    quotad_used = json.loads(out)
    assert quotad_used <= 0.25 * 4.0 * (1 + TOLERANCE) + 0.1, quotad_used


class _Counter(Sandbox):
    """A sandbox whose CPU counter reads ``used``."""

    def __init__(self, used: float | None) -> None:
        self.used = used

    def cpu_time_seconds(self) -> float | None:
        return self.used

    def kill(self) -> None: ...

    def collect(self) -> Usage:
        return Usage()

    def remove(self) -> None: ...


def test_the_cpu_deadline_is_the_soonest_the_budget_could_be_spent() -> None:
    budget = CpuBudget(Limits(cpu_time_seconds=2.0), cpus=4)
    assert budget.first_deadline(100.0) == 100.5  # 4 CPUs spend 2 s in 0.5 s at best
    assert budget.check(_Counter(1.0), 10.0) == (False, 10.25)
    assert budget.check(_Counter(1.9999), 10.0) == (False, 10.0 + MIN_CHECK_SECONDS)
    assert budget.check(_Counter(2.0), 10.0) == (True, None)
    assert budget.check(_Counter(None), 10.0) == (False, None)  # unmeasurable: RLIMIT_CPU only
    quotad = CpuBudget(Limits(cpu_time_seconds=2.0, cpu_quota=0.5), cpus=4)
    assert quotad.first_deadline(0.0) == 4.0  # half a CPU needs 4 s for 2 s of CPU
    assert CpuBudget(Limits(), cpus=4).first_deadline(0.0) is None


def test_a_waiting_task_costs_a_few_counter_reads(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No busy polling: a task that sleeps 1 s under a 1 s budget is read about once per
    (budget left / CPUs), a handful of times, not every loop round."""
    reads = []
    check = CpuBudget.check

    def counted(self: CpuBudget, sandbox: Sandbox, now: float) -> tuple[bool, float | None]:
        reads.append(now)
        return check(self, sandbox, now)

    monkeypatch.setattr(CpuBudget, "check", counted)
    result = run_one(backend, tasks.sleep_then, 1.0, "slept", cpu_time_limit_seconds=1)
    assert result.success and result.result == "slept", result.exception
    assert 1 <= len(reads) <= 2 * (os.cpu_count() or 1) + 2, reads


@pytest.mark.parametrize(("known", "expected"), [(True, 0.1), (False, 0.25)])
def test_the_kernels_cpu_count_wins_a_polled_sample_does_not(known: bool, expected: float) -> None:
    """The worker's rusage (0.25 s) counts over a polled sample that missed the end (0.1 s),
    never over the kernel's own counter."""
    usage = Usage(cpu_time_seconds=0.1)
    result = outcome.build_result(
        job_with(RETURNED_42), usage, 0, dataclasses.replace(outcome_terms(), cpu_time_known=known)
    )
    assert result.cpu_time_used_seconds == expected


def test_a_cpu_time_kill_is_classified_whatever_the_exit_code() -> None:
    result = outcome.build_result(
        job_with(None, KillReason.CPU_TIME), Usage(cpu_time_seconds=1.02), -9,
        outcome_terms(cpu_time_limit_seconds=1),
    )  # fmt: skip
    assert (result.success, result.cpu_time_limit_exceeded) == (False, True)
    assert isinstance(result.exception, CpuTimeLimitExceeded)
    assert "1.020 s of CPU used" in str(result.exception)
    assert outcome.classify(result) is outcome.Verdict.CPU_TIME_EXCEEDED


def test_psutil_says_the_quota_is_not_available() -> None:
    with pytest.raises(BackendUnavailable, match=r"cpu_quota.*psutil"):
        ProcessManager(1, backend="psutil", cpu_quota=0.5)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "positive"),
        (-1, ValueError, "positive"),
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        ((os.cpu_count() or 1) + 1, ValueError, "CPUs"),
        (0.001, ValueError, "at least 0.01"),
        ("0.5", TypeError, "number"),
        (True, TypeError, "number"),
    ],
)
def test_bad_quotas_are_refused_at_construction(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ProcessManager(1, backend="psutil", cpu_quota=value)  # type: ignore[arg-type]


def test_the_cpu_quota_is_in_the_limits() -> None:
    assert ProcessManager(1, backend="psutil").limits.cpu_quota is None
    cpus = float(os.cpu_count() or 1)
    with pytest.raises(BackendUnavailable):  # validated first: the machine's count is fine
        ProcessManager(1, backend="psutil", cpu_quota=cpus)


def test_cpuacct_only_when_a_cpu_limit_is_set() -> None:
    """The trivial-task path makes no cpuacct cgroup (where cpuacct is its own hierarchy)."""
    from sandboxrun._backends import create_backend

    try:
        backend = create_backend("cgroup_v1")
    except BackendUnavailable as error:
        pytest.skip(str(error))
    if "cpuacct" not in backend.own or backend.own["cpuacct"] == backend.own.get("cpu"):
        pytest.skip("no separate cpuacct hierarchy here")
    backend.open()  # type: ignore[no-untyped-call]
    try:
        plain = backend.sandbox(Limits())
        timed = backend.sandbox(Limits(cpu_time_seconds=5.0))
        try:
            assert "cpuacct" not in plain.dirs and "cpuacct" in timed.dirs  # type: ignore[attr-defined]
            assert plain.cpu_time_seconds() is None
            assert timed.cpu_time_seconds() == 0.0
        finally:
            plain.remove()
            timed.remove()
    finally:
        backend.close()


# --------------------------------------------------------------------- the command line

runner = CliRunner()
PY = sys.executable


def test_cli_cpus_and_the_json_record(kernel_backend: str) -> None:
    spin = "import time\nend = time.monotonic() + 1\nwhile time.monotonic() < end: pass"
    started = time.monotonic()
    result = runner.invoke(
        app, ["run", "--backend", kernel_backend, "--cpus", "0.25", "--json", "--", PY, "-c", spin]
    )
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1
    record = json.loads(result.stdout)
    # The quota bounds CPU per wall second: of the task's own wall time (under emulation the
    # interpreter's start alone takes seconds).
    wall = max(1.5, record["elapsed_time"])
    assert record["cpu_time_used_seconds"] <= 0.25 * wall * (1 + TOLERANCE) + 0.1
    assert record["cpu_throttled_periods"] > 0
    assert {"cpu_throttled_seconds", "cpu_time_limit_exceeded"} <= set(record)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "lots", "100000"])
def test_cli_bad_cpus_is_a_usage_error(value: str) -> None:
    result = runner.invoke(app, ["run", "--cpus", value, "--", "true"])
    assert result.exit_code == 2, result.output


def test_cli_cpu_time_counts_the_tree(backend: str) -> None:
    """`run --cpu-time 1s` on a command whose 3 children spin 1.5 s each: exit 122."""
    spin = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        s = time.process_time()\n"
        "        while time.process_time() - s < 1.5: pass\n"
        "        os._exit(0)\n"
        "for _ in range(3): os.wait()\n"
    )
    result = runner.invoke(
        app, ["run", "--backend", backend, "--cpu-time", "1s", "--", PY, "-c", spin]
    )
    assert result.exit_code == 122, result.output


# --------------------------------------------------------------------- cgroup v2 and systemd
# Not runnable on this host (hybrid, no systemd): the files they write and read, on fake ones.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cgroup backends are Linux")
def test_cgroup_v2_quota_and_counters_on_fake_files(tmp_path: Path) -> None:
    from sandboxrun._backends.cgroup_v2 import counters

    (tmp_path / "cpu.max").write_text("max 100000\n")  # the kernel makes it; we only write
    counters.write_cpu_max(tmp_path, 0.5)
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
        "nr_periods 40\nnr_throttled 12\nthrottled_usec 2500000\n"
    )
    assert counters.cpu_time_seconds(tmp_path) == 1.5
    usage = counters.read_usage(tmp_path, sampled_peak=0)
    assert (usage.cpu_time_seconds, usage.cpu_throttled_periods) == (1.5, 12)
    assert usage.cpu_throttled_seconds == 2.5
    # Without the cpu controller cpu.stat has only the three usage lines: no throttling known.
    (tmp_path / "cpu.stat").write_text("usage_usec 7\nuser_usec 5\nsystem_usec 2\n")
    usage = counters.read_usage(tmp_path, sampled_peak=0)
    assert (usage.cpu_throttled_periods, usage.cpu_throttled_seconds) == (None, None)
    files = dict.fromkeys(counters.PROBED_FILES, True)
    assert "cpu_quota" in counters.enforced(files)
    assert "cpu_quota" not in counters.enforced({**files, "cpu.max": False})
    assert "cpu_time" in counters.enforced({**files, "cpu.max": False})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cgroup backends are Linux")
def test_systemd_task_scope_takes_the_tasks_quota() -> None:
    from sandboxrun._backends.systemd import task_scope

    def quota(limits: Limits, backend_quota: float | None) -> object:
        found = task_scope.task_properties(limits, 1, "sandboxrun.slice", backend_quota)
        return {name: value for name, _, value in found}.get("CPUQuotaPerSecUSec")

    assert quota(Limits(cpu_quota=0.25), None) == 250_000
    assert quota(Limits(cpu_quota=0.25), 1.5) == 250_000  # the task's own wins
    assert quota(Limits(), 1.5) == 1_500_000  # else the backend-wide one
    assert quota(Limits(), None) is None
