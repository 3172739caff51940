"""Every limit is checked up front against what the kernel and Python can represent."""

from __future__ import annotations

import math
import os
import pathlib
import resource
import selectors

import pytest

from sandboxrun import _limits as limits
from sandboxrun._limits import GIB, Limits, parse_duration, parse_size


def _limits(**kwargs):
    arguments = {
        "worker_timeout_seconds": None,
        "memory_limit_in_gib": None,
        "cpu_time_limit_seconds": None,
        "max_processes": None,
    }
    arguments.update(kwargs)
    return Limits.from_arguments(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"worker_timeout_seconds": 2**31 / 1000}, "maximum 2147483"),
        ({"worker_timeout_seconds": 1e30}, "maximum"),
        ({"worker_timeout_seconds": math.inf}, "finite"),
        ({"worker_timeout_seconds": 10**400}, "finite"),
        ({"memory_limit_in_gib": 1e30}, "2\\*\\*63"),
        ({"memory_limit_in_gib": 2**33}, "maximum"),
        ({"cpu_time_limit_seconds": 1e30}, "maximum 1000000000"),
        ({"cpu_time_limit_seconds": math.nan}, "finite"),
        ({"max_processes": 10**7}, "PID_MAX_LIMIT"),
        ({"max_processes": 4_194_305}, "maximum 4194304"),
    ],
)
def test_values_beyond_what_the_kernel_takes_name_the_maximum(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _limits(**kwargs)


def test_the_maxima_are_accepted():
    got = _limits(
        worker_timeout_seconds=limits.MAX_WALL_TIME_SECONDS,
        memory_limit_in_gib=limits.MAX_MEMORY_BYTES / GIB,
        cpu_time_limit_seconds=limits.MAX_CPU_TIME_SECONDS,
        max_processes=limits.MAX_PROCESSES,
    )
    assert got.memory_bytes == limits.MAX_MEMORY_BYTES and got.memory_bytes % 4096 == 0
    assert got.max_processes == 4_194_304


def test_the_wall_time_maximum_fits_the_event_loop():
    # The selector raises on 2**31 ms; the maximum, rounded up to whole ms, does not reach it.
    with selectors.DefaultSelector() as selector, pytest.raises(OverflowError):
        selector.select(2**31 / 1000)
    assert math.ceil(limits.MAX_WALL_TIME_SECONDS * 1000) <= 2**31 - 1
    assert math.isfinite(limits.MAX_WALL_TIME_SECONDS + 1e9)


def test_the_cpu_time_maximum_fits_setrlimit():
    # what the worker computes: whole seconds, soft and soft + 1, as a C long long
    soft = int(limits.MAX_CPU_TIME_SECONDS + 0.999) + 10**6
    assert soft + 1 < 2**63 - 1 and (soft + 1) * 10**9 < 2**64
    with pytest.raises(OverflowError):
        resource.setrlimit(resource.RLIMIT_CPU, (int(1e30), int(1e30) + 1))


def test_the_memory_maximum_is_what_the_kernel_parses():
    assert limits.MAX_MEMORY_BYTES < 2**63 and (10**30 * 1) % 2**64 < 2**63  # 1e30 would wrap
    assert _limits(memory_limit_in_gib=2**33 - 1).memory_bytes == (2**33 - 1) * GIB


@pytest.mark.parametrize("name", ["worker_timeout_seconds", "memory_limit_in_gib"])
def test_zero_means_no_limit_as_in_glasswall(name):
    unlimited = Limits(max_processes=limits.DEFAULT_MAX_PROCESSES)  # the one default limit
    got = _limits(**{name: 0})
    assert got == unlimited
    assert _limits(**{name: 0.0}) == unlimited


def test_max_processes_has_a_default_and_zero_means_none():
    # Not given: the default (a task cannot exhaust the host's pids unasked); 0: no limit, as 0
    # is for Glasswall's limits; anything else as given.
    assert _limits().max_processes == limits.DEFAULT_MAX_PROCESSES
    assert _limits(max_processes=0).max_processes is None
    assert _limits(max_processes=7).max_processes == 7
    with pytest.raises(ValueError, match="0 means no limit"):
        _limits(max_processes=-1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"worker_timeout_seconds": -1}, ValueError),
        ({"worker_timeout_seconds": math.nan}, ValueError),
        ({"worker_timeout_seconds": "5"}, TypeError),
        ({"worker_timeout_seconds": True}, TypeError),
        ({"memory_limit_in_gib": -2}, ValueError),
        ({"memory_limit_in_gib": 1e-12}, ValueError),
        ({"cpu_time_limit_seconds": 0}, ValueError),
        ({"cpu_time_limit_seconds": -1}, ValueError),
        ({"max_processes": -3}, ValueError),
        ({"max_processes": 2.5}, TypeError),
        ({"max_processes": 2.0}, TypeError),
        ({"max_processes": True}, TypeError),
    ],
)
def test_other_bad_values_stay_errors(kwargs, error):
    with pytest.raises(error):
        _limits(**kwargs)


def test_valid_values_convert():
    got = _limits(worker_timeout_seconds=5, memory_limit_in_gib=0.5, cpu_time_limit_seconds=2,
                  max_processes=64)  # fmt: skip
    assert got == Limits(5.0, GIB // 2, 2.0, 64)
    assert isinstance(got.wall_time_seconds, float)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (0, None), (0.0, None), (1, 1), (2.0, 2), (64, 64), (4_194_304, 4_194_304)],
)
def test_max_workers_like_glasswall(value, expected):
    got = limits.validate_max_workers(value)
    assert got == expected and (got is None or type(got) is int)


@pytest.mark.parametrize(
    ("value", "error"),
    [(1.5, TypeError), (True, TypeError), ("2", TypeError), (math.inf, TypeError),
     (math.nan, TypeError), (-1, ValueError), (-2.0, ValueError), (10**7, ValueError)],
)  # fmt: skip
def test_bad_max_workers(value, error):
    with pytest.raises(error):
        limits.validate_max_workers(value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0, -0.5, 1e30, "1", None])
def test_bad_poll_intervals(value):
    with pytest.raises((ValueError, TypeError)):
        limits.validate_poll_interval(value)


def test_good_poll_interval():
    assert limits.validate_poll_interval(0.05) == 0.05
    assert limits.validate_poll_interval(1) == 1.0


def test_max_result_bytes_default_follows_the_memory_limit():
    assert limits.validate_max_result_bytes(None, None) == limits.DEFAULT_MAX_RESULT_BYTES == GIB
    assert limits.validate_max_result_bytes(None, 256 << 20) == 256 << 20
    assert limits.validate_max_result_bytes(10, 256 << 20) == 10
    for bad in (0, -1, 2**63, 1.5):
        with pytest.raises((ValueError, TypeError)):
            limits.validate_max_result_bytes(bad, None)


@pytest.mark.parametrize("text", ["800h", "9999999999s", "1e30", 2**31])
def test_cli_durations_over_the_maximum_are_value_errors(text):
    with pytest.raises(ValueError, match="at most 2147483 seconds"):
        parse_duration(text, maximum=limits.MAX_WALL_TIME_SECONDS)
    assert parse_duration("800h") == 800 * 3600  # no maximum unless asked


def test_cli_duration_maximum_is_adjustable():
    assert parse_duration("800h", maximum=limits.MAX_CPU_TIME_SECONDS) == 800 * 3600


@pytest.mark.parametrize("text", ["1e30G", "9" * 400, "1e400", 1e30, "8589934592G"])
def test_cli_sizes_over_the_maximum_are_value_errors(text):
    with pytest.raises(ValueError, match=r"at most|finite"):
        parse_size(text, maximum=limits.MAX_MEMORY_BYTES)


@pytest.mark.parametrize("text", ["1e400", "1e400G", float("inf"), float("nan")])
def test_sizes_beyond_float_are_value_errors_not_overflow(text):
    with pytest.raises(ValueError, match="finite"):
        parse_size(text)


def test_cli_max_processes_error_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="max_processes=99999999 is over the maximum 4194304"):
        limits.validate_max_processes(99999999)


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a pids cgroup")
def test_pids_max_accepts_exactly_up_to_the_maximum():
    """The kernel's own answer, in a throw-away child of this process's v1 pids cgroup."""
    lines = pathlib.Path("/proc/self/cgroup").read_text().splitlines()
    line = next((x for x in lines if x.split(":")[1] == "pids"), None)
    root = "/sys/fs/cgroup/pids"
    if line is None or not os.path.isdir(root):
        pytest.skip("no v1 pids hierarchy")
    probe = os.path.join(root + line.split(":", 2)[2], f"sandboxrun-limits-probe-{os.getpid()}")
    os.mkdir(probe)
    try:
        path = os.path.join(probe, "pids.max")
        with open(path, "w") as file:
            file.write(str(limits.MAX_PROCESSES))
        assert pathlib.Path(path).read_text().strip() == str(limits.MAX_PROCESSES)
        with pytest.raises(OSError), open(path, "w") as file:
            file.write(str(limits.MAX_PROCESSES + 1))
    finally:
        os.rmdir(probe)
