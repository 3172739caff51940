"""The per-task limits, validated once against what the kernel and Python can represent, and
the one parser for sizes and durations.

Every maximum below is where a value stops meaning what the user asked for:

    MAX_WALL_TIME_SECONDS   2_147_483 s (~24.8 days). epoll/select take the timeout in ms as a C
                            int: 2**31 ms raises OverflowError in the event loop, and the
                            scheduler's select timeout is at most the nearest deadline - now.
    MAX_MEMORY_BYTES        2**63 - 4096. cgroup memory files parse a u64 (10**30 wraps modulo
                            2**64: instant OOM) and clamp at LONG_MAX pages; this is the largest
                            page-aligned value below 2**63.
    MAX_CPU_TIME_SECONDS    10**9 s (~31.7 years). RLIMIT_CPU is whole seconds (rlim_t, and
                            setrlimit() takes a C long long: 1e30 is an OverflowError in the
                            worker), and the kernel's CPU timers count it in u64 nanoseconds
                            (overflow past ~584 years).
    MAX_PROCESSES           4_194_304 = PID_MAX_LIMIT (2**22). pids.max refuses anything above
                            it with EINVAL (checked on a v1 pids cgroup: 4194304 is accepted,
                            4194305 and 10**7 are not).
    MAX_WORKERS             the same: each worker is a process.
    cpu_quota               MIN_CPU_QUOTA (0.01 CPU) .. the machine's CPU count. CFS bandwidth
                            control refuses a quota under 1 ms per period (EINVAL below
                            cpu.cfs_quota_us=1000); a quota above the CPUs there are caps
                            nothing and is a slip.

Glasswall compatibility: ``0`` means "no limit" for ``worker_timeout_seconds`` and
``memory_limit_in_gib`` (its watcher tests ``if self.timeout_seconds:``), and ``max_workers=0``
means the CPU count (``max_workers or os.cpu_count()``); ``max_workers=2.0`` works there, so an
integral float is accepted. The manager keeps reporting what the user passed
(``TaskResult.timeout_seconds == 0``), as Glasswall does; only ``Limits`` says ``None``.
``max_processes`` follows the same rule for ``0`` (no limit), but ``None`` is not "no limit"
there: it is ``DEFAULT_MAX_PROCESSES``, so a task cannot exhaust the host's pids unasked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1024**3
PAGE = 4096
MAX_WALL_TIME_SECONDS = float((2**31 - 1) // 1000)  # 2_147_483 s
MAX_MEMORY_BYTES = 2**63 - PAGE
MAX_CPU_TIME_SECONDS = 1_000_000_000.0
MAX_PROCESSES = 4_194_304
MAX_WORKERS = MAX_PROCESSES
MAX_POLL_INTERVAL_SECONDS = MAX_WALL_TIME_SECONDS
#: CFS bandwidth period used for a task's quota (the kernel's default, 100 ms) and the least
#: runtime per period it accepts (1 ms): ``cpu.max`` = "<quota * period> <period>".
CPU_PERIOD_USEC = 100_000
MIN_CPU_QUOTA = 1_000 / CPU_PERIOD_USEC
DEFAULT_MAX_RESULT_BYTES = GIB  # see sandboxrun/_header.py for the reasoning
#: ``max_processes`` when none is given: processes and threads of one task at once (pids.max
#: counts both). Room for any converter's thread pools and helper processes, while a fork or
#: thread bomb stops long before it exhausts the host's pid space (pid_max).
DEFAULT_MAX_PROCESSES = 1024
#: The least memory limit under which a task's worker starts at all (the zygote's fork of PID 1
#: and PID 2 under the default isolation, measured on cgroup v1): below it the worker is
#: OOM-killed before task code, and the failed result says to raise the limit.
MIN_WORKER_MEMORY_BYTES = 4 * 2**20

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def _number(name: str, value: object) -> float:
    """``value`` as a float, refusing bools, strings and NaN/inf (TypeError / ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r} (use None for no limit)")
    return number


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:.6g}"


def _limit(
    name: str, value: object, maximum: float, what: str, *, zero_is_none: bool
) -> float | None:
    """``value`` as a float in 0..maximum (TypeError/ValueError naming ``name`` and ``what``
    sets the maximum); None stays None, and so does 0 when ``zero_is_none``."""
    if value is None:
        return None
    number = _number(name, value)
    none = " (0 or None means no limit)" if zero_is_none else " (None means no limit)"
    if number < 0 or (number == 0 and not zero_is_none):
        raise ValueError(f"{name} must be positive, got {value!r}{none}")
    if number > maximum:
        raise ValueError(f"{name}={value!r} is over the maximum {_show(maximum)} ({what}){none}")
    return number or None


def validate_wall_time(value: float | None) -> float | None:
    """``worker_timeout_seconds`` -> seconds or None; 0 means no limit (as in Glasswall)."""
    what = "the event loop waits in C-int milliseconds"
    return _limit("worker_timeout_seconds", value, MAX_WALL_TIME_SECONDS, what, zero_is_none=True)


def validate_memory(value: float | None) -> int | None:
    """``memory_limit_in_gib`` -> bytes or None; 0 means no limit (as in Glasswall)."""
    what = "the kernel's largest memory limit, 2**63 bytes"
    gib = _limit("memory_limit_in_gib", value, MAX_MEMORY_BYTES / GIB, what, zero_is_none=True)
    if gib is None:
        return None
    memory = min(math.ceil(gib * GIB), MAX_MEMORY_BYTES)
    if memory < PAGE:
        raise ValueError(f"memory_limit_in_gib={value!r} is below one page ({PAGE} bytes)")
    return memory


def validate_cpu_time(value: float | None) -> float | None:
    """``cpu_time_limit_seconds`` -> seconds or None (0 is refused: sandboxrun's own option)."""
    what = "RLIMIT_CPU seconds, counted in u64 nanoseconds by the kernel"
    return _limit("cpu_time_limit_seconds", value, MAX_CPU_TIME_SECONDS, what, zero_is_none=False)


def validate_cpu_quota(value: float | None) -> float | None:
    """``cpu_quota`` (CPUs, e.g. 0.5 = half a CPU) -> float or None; at least MIN_CPU_QUOTA,
    at most the CPUs of this machine (``os.cpu_count()``)."""
    if value is None:
        return None
    quota = _number("cpu_quota", value)
    if quota <= 0:
        raise ValueError(f"cpu_quota must be positive, got {value!r} (None means no quota)")
    if quota < MIN_CPU_QUOTA:
        raise ValueError(
            f"cpu_quota={value!r} is too small: it must be at least {MIN_CPU_QUOTA} CPU (the"
            " kernel's CFS bandwidth control takes no less than 1 ms per 100 ms period)"
        )
    cpus = os.cpu_count() or 1
    if quota > cpus:
        raise ValueError(
            f"cpu_quota={value!r} is more CPUs than this machine has ({cpus}): a quota that"
            " high caps nothing (None means no quota)"
        )
    return quota


def _integer(name: str, value: object, *, integral_float: bool) -> int:
    if isinstance(value, float) and integral_float and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int (or an integral float)" if integral_float else "an int"
        raise TypeError(f"{name} must be {kind} or None, got {value!r}")
    return value


def validate_max_processes(value: int | None) -> int | None:
    """``max_processes`` -> int, or None for no limit; ``None`` (not given) is
    ``DEFAULT_MAX_PROCESSES`` and ``0`` means no limit (as 0 does for Glasswall's limits); at
    most PID_MAX_LIMIT (what ``pids.max`` accepts)."""
    if value is None:
        return DEFAULT_MAX_PROCESSES
    count = _integer("max_processes", value, integral_float=False)
    none = f" (0 means no limit; not given: {DEFAULT_MAX_PROCESSES})"
    if count < 0:
        raise ValueError(f"max_processes must be positive, got {value!r}{none}")
    if count > MAX_PROCESSES:
        what = "the kernel's PID_MAX_LIMIT, the most pids.max accepts"
        raise ValueError(
            f"max_processes={value!r} is over the maximum {_show(MAX_PROCESSES)} ({what}){none}"
        )
    return count or None


def validate_max_workers(value: float | None) -> int | None:
    """``max_workers`` -> int, or None for "the CPUs this process may use".

    As in Glasswall: ``0`` (and None) mean the CPU count; ``2.0`` is 2; ``1.5`` is a TypeError.
    """
    if value is None:
        return None
    count = _integer("max_workers", value, integral_float=True)
    if count < 0:
        raise ValueError(f"max_workers must be at least 1, got {value!r} (0 or None: the CPUs)")
    if count > MAX_WORKERS:
        raise ValueError(
            f"max_workers={value!r} is over the maximum {MAX_WORKERS}"
            " (each worker is a process: the kernel's PID_MAX_LIMIT)"
        )
    return count or None


def validate_poll_interval(value: float) -> float:
    """``poll_interval_seconds``: positive, finite, at most MAX_POLL_INTERVAL_SECONDS."""
    seconds = _number("poll_interval_seconds", value)
    if not 0 < seconds <= MAX_POLL_INTERVAL_SECONDS:
        raise ValueError(
            f"poll_interval_seconds must be > 0 and at most {_show(MAX_POLL_INTERVAL_SECONDS)}"
            f" (the event loop waits in C-int milliseconds), got {value!r}"
        )
    return seconds


def validate_max_result_bytes(value: int | None, memory_bytes: int | None) -> int:
    """``max_result_bytes`` -> bytes. None: the task's memory limit if it has one (a result the
    task could hold always fits), else DEFAULT_MAX_RESULT_BYTES (1 GiB)."""
    if value is None:
        return memory_bytes if memory_bytes is not None else DEFAULT_MAX_RESULT_BYTES
    size = _integer("max_result_bytes", value, integral_float=False)
    if not 0 < size <= MAX_MEMORY_BYTES:
        raise ValueError(f"max_result_bytes must be in 1..{MAX_MEMORY_BYTES}, got {value!r}")
    return size


def parse_size(text: str | int | float, *, maximum: int | None = None) -> int:
    """Bytes from ``512M``, ``1.5G``, ``4GiB``, ``100kb`` or a plain number of bytes.

    A bare letter (K, M, G, T) is binary, like ``ulimit`` and systemd; ``KB``/``MB``/``GB`` are
    decimal; ``KiB``/``MiB``/``GiB`` binary. Over ``maximum`` (e.g. ``MAX_MEMORY_BYTES``) is a
    ValueError naming it; NaN/inf never parse.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _NUMBER_UNIT.match(text)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {text!r} (examples: 512M, 1.5G, 4GiB, 1048576)")
        value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value):
        raise ValueError(f"a size must be finite: {text!r}")
    if maximum is not None and value * _SIZE_UNITS[unit] > maximum:
        raise ValueError(f"a size must be at most {maximum} bytes: {text!r}")
    size = math.ceil(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return size


def parse_duration(text: str | int | float, *, maximum: float | None = None) -> float:
    """Seconds from ``500ms``, ``5s``, ``2m``, ``1h`` or a plain number of seconds; over
    ``maximum`` (e.g. ``MAX_WALL_TIME_SECONDS``, ~24.8 days) is a ValueError naming it."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _NUMBER_UNIT.match(text)
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            raise ValueError(f"not a duration: {text!r} (examples: 500ms, 5s, 2m, 30)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"a duration must be positive and finite: {text!r}")
    if maximum is not None and seconds > maximum:
        days = f" (about {maximum / 86400:.0f} days)" if maximum >= 86400 else ""
        raise ValueError(f"a duration must be at most {_show(maximum)} seconds{days}: {text!r}")
    return seconds


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one task may use. ``None`` means unlimited."""

    wall_time_seconds: float | None = None
    memory_bytes: int | None = None
    cpu_time_seconds: float | None = None
    max_processes: int | None = None
    cpu_quota: float | None = None  # CPUs (0.5 = half a CPU), for the whole task tree

    @classmethod
    def from_arguments(
        cls,
        worker_timeout_seconds: float | None,
        memory_limit_in_gib: float | None,
        cpu_time_limit_seconds: float | None,
        max_processes: int | None,
        cpu_quota: float | None = None,
    ) -> Limits:
        """The limits from ``ProcessManager``'s arguments (``max_processes=None``: the default
        ``DEFAULT_MAX_PROCESSES``); TypeError/ValueError naming the argument and its maximum for
        anything the kernel or Python could not represent."""
        return cls(
            wall_time_seconds=validate_wall_time(worker_timeout_seconds),
            memory_bytes=validate_memory(memory_limit_in_gib),
            cpu_time_seconds=validate_cpu_time(cpu_time_limit_seconds),
            max_processes=validate_max_processes(max_processes),
            cpu_quota=validate_cpu_quota(cpu_quota),
        )
