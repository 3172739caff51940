"""The per-task limits, validated once, and the one parser for sizes and durations."""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes from ``512M``, ``1.5G``, ``4GiB``, ``100kb`` or a plain number of bytes.

    A bare letter (K, M, G, T) is binary, like ``ulimit`` and systemd; ``KB``/``MB``/``GB`` are
    decimal; ``KiB``/``MiB``/``GiB`` binary.
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
    size = math.ceil(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return size


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``500ms``, ``5s``, ``2m``, ``1h`` or a plain number of seconds."""
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
    return seconds


def _positive(name: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if not value > 0 or math.isinf(value) or math.isnan(value):
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one task may use. ``None`` means unlimited."""

    wall_time_seconds: float | None = None
    memory_bytes: int | None = None
    cpu_time_seconds: float | None = None
    max_processes: int | None = None

    @classmethod
    def from_arguments(
        cls,
        worker_timeout_seconds: float | None,
        memory_limit_in_gib: float | None,
        cpu_time_limit_seconds: float | None,
        max_processes: int | None,
    ) -> Limits:
        _positive("worker_timeout_seconds", worker_timeout_seconds)
        _positive("memory_limit_in_gib", memory_limit_in_gib)
        _positive("cpu_time_limit_seconds", cpu_time_limit_seconds)
        _positive("max_processes", max_processes, integer=True)
        memory = None if memory_limit_in_gib is None else math.ceil(memory_limit_in_gib * GIB)
        if memory is not None and memory < 4096:
            raise ValueError(f"memory_limit_in_gib={memory_limit_in_gib!r} is below one page")
        return cls(
            wall_time_seconds=None
            if worker_timeout_seconds is None
            else float(worker_timeout_seconds),
            memory_bytes=memory,
            cpu_time_seconds=None
            if cpu_time_limit_seconds is None
            else float(cpu_time_limit_seconds),
            max_processes=max_processes,
        )
