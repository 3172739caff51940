"""``Task`` and ``TaskResult``: the data that enters and leaves a ``ProcessManager``.

Both keep the contract of the Glasswall process manager (field names, meanings, GiB = 1024**3,
equality and hash of a task by function, args and kwargs, truncated reprs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_REPR_LIMIT = 100


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


class Task:
    """A function and its arguments, to be run in a fresh process under the manager's limits."""

    __slots__ = ("args", "func", "kwargs")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(func):
            raise TypeError(f"Task func must be callable, got {type(func).__name__}: {func!r:.80}")
        if args is not None and not isinstance(args, (tuple, list)):
            raise TypeError(f"Task args must be a tuple or list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"Task kwargs must be a dict, got {type(kwargs).__name__}")
        if kwargs and not all(isinstance(key, str) for key in kwargs):
            raise TypeError("Task kwargs keys must be strings")
        self.func = func
        self.args: tuple[Any, ...] = tuple(args) if args else ()
        self.kwargs: dict[str, Any] = dict(kwargs) if kwargs else {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Task):
            return NotImplemented
        return (self.func, self.args, self.kwargs) == (other.func, other.args, other.kwargs)

    def __hash__(self) -> int:
        try:
            return hash((self.func, self.args, tuple(sorted(self.kwargs.items()))))
        except TypeError:  # unhashable arguments: fall back to what is always hashable
            return hash((self.func, len(self.args), tuple(sorted(self.kwargs))))

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", None) or getattr(self.func, "__name__", None)
        name = name or repr(self.func)
        args = ", ".join(_short(arg) for arg in self.args)
        kwargs = ", ".join(f"{key}={_short(value)}" for key, value in self.kwargs.items())
        return f"Task(func={name}, args=({args}), kwargs=({kwargs}))"

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.func, self.args, self.kwargs)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.func, self.args, self.kwargs = state


@dataclasses.dataclass(eq=False)
class TaskResult:
    """The outcome of one task. The first 13 fields are the Glasswall manager's, same meanings.

    Beyond the seed: ``exit_code`` is never ``None`` once the process ended (negative = killed by
    that signal), ``exception`` is never ``None`` when ``success`` is False, and
    ``max_memory_used_in_gib`` is filled whether or not a limit was set (``None`` only when
    nothing measured it: the sandbox's counters could not be read and no result frame came).
    """

    task: Task
    success: bool
    result: Any = None
    exception: BaseException | None = None
    exit_code: int | None = None
    timeout_seconds: float | None = None
    memory_limit_in_gib: float | None = None
    start_time: float = 0.0
    end_time: float = 0.0
    elapsed_time: float = 0.0
    timed_out: bool = False
    max_memory_used_in_gib: float | None = 0.0
    out_of_memory: bool = False
    # --- sandboxrun's own fields, after the 13 ---
    cpu_time_used_seconds: float | None = None
    cpu_time_limit_exceeded: bool = False
    process_limit_exceeded: bool = False
    backend: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskResult):
            return NotImplemented
        mine = (self.task, self.success, self.result, self.exception)
        return mine == (other.task, other.success, other.result, other.exception)

    def __hash__(self) -> int:
        return hash((self.task, self.success))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{field.name}={_short(getattr(self, field.name))}"
            for field in dataclasses.fields(self)
        )
        return f"TaskResult({fields})"
