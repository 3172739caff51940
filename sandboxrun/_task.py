"""``Task`` and ``TaskResult``: the data that enters and leaves a ``ProcessManager``.

Both keep the contract of the Glasswall process manager, character for character where users can
see it: field names and meanings, GiB = 1024**3, equality and hash of a task by function, args
and kwargs, a plain ``Task`` object (attributes can be set, ``vars(task)`` works, any iterable
``args``), Glasswall content-management policies passed as their XML text, the same truncated
reprs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_REPR_LIMIT = 100
_ELLIPSIS = "..."
# Glasswall's policy classes live in this package: policy.Policy and its subclasses
# editor.Editor, rebuild.Rebuild, archive_manager.ArchiveManager, word_search.WordSearch.
_POLICY_PACKAGE = "glasswall.content_management.policies"


def _short(value: Any) -> str:
    """``repr`` cut like Glasswall's ``Task``: the first 100 characters, then ``...``."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + _ELLIPSIS


def _field(name: str, value: Any) -> str:
    """``name=repr`` cut like Glasswall's ``TaskResult``.

    Glasswall cuts the whole ``name=repr`` at 100 characters but adds ``...`` only when the repr
    alone is over 100, so a repr just under 100 loses its tail without the marker. Reprs are
    compared in logs and tests, so the quirk is kept on purpose.
    """
    text = repr(value)
    return f"{name}={text}"[:_REPR_LIMIT] + (_ELLIPSIS if len(text) > _REPR_LIMIT else "")


def _stays_in_manager() -> None:
    """What a ``LaunchHook`` becomes once pickled: nothing."""
    return None


class LaunchHook:
    """A call the manager makes just before a task's process starts, given the (uid, gid) the
    task will act as on the folders it is given (None: the manager's own -- also under a
    profile that hands paths idmapped, where the task acts on them as the manager).
    ``sandboxrun batch`` hands the task's staging folder to that uid with it. It never leaves
    the manager: pickled (the payload of spawn and forkserver, a Dask cluster's task) it
    becomes None."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[[tuple[int, int] | None], None]) -> None:
        self.function = function

    def __call__(self, ids: tuple[int, int] | None) -> None:
        self.function(ids)

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _stays_in_manager, ()


def _is_glasswall_policy(value: Any) -> bool:
    # Recognised by the defining module of any class in its MRO, not by isinstance: importing
    # glasswall here would pull the engine wrapper (and lxml) into every sandboxrun user. The MRO
    # also catches a user's own subclass of a Glasswall policy, as isinstance does upstream.
    for cls in type(value).__mro__:
        module = getattr(cls, "__module__", None)
        if isinstance(module, str) and (
            module == _POLICY_PACKAGE or module.startswith(_POLICY_PACKAGE + ".")
        ):
            return True
    return False


def _plain(value: Any) -> Any:
    # A Glasswall policy holds modules in its attributes and defines __getattr__: it pickles but
    # recurses without end when a spawn/forkserver worker unpickles it. Its engine-facing form is
    # its XML text, which every Glasswall engine call accepts in place of the object.
    return value.text if _is_glasswall_policy(value) else value


def _arguments(args: Iterable[Any] | None) -> tuple[Any, ...]:
    if not args:  # None, (), [] - and, as upstream, any other empty/falsy value
        return ()
    if isinstance(args, (str, bytes, bytearray)):
        # Iterable, but as args it is always a slip for args=(text,): refuse rather than call
        # func with one character per argument (Glasswall would).
        raise TypeError(
            f"Task args must be an iterable of arguments, got a {type(args).__name__}: "
            f"write args=({args!r:.60},) to pass it as one argument"
        )
    try:
        items = iter(args)
    except TypeError:
        raise TypeError(
            f"Task args must be an iterable (tuple, list, generator...), got {type(args).__name__}"
        ) from None
    return tuple(_plain(arg) for arg in items)


def _keyword_arguments(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if not kwargs:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"Task kwargs must be a dict (or mapping), got {type(kwargs).__name__}")
    if not all(isinstance(key, str) for key in kwargs):
        raise TypeError("Task kwargs keys must be strings (they become keyword arguments)")
    return {key: _plain(value) for key, value in kwargs.items()}


class Task:
    """A function and its arguments, to be run in a fresh process under the manager's limits.

    A plain object, as in Glasswall: extra attributes may be set on it and travel with it to the
    worker; ``args`` is stored as a tuple, ``kwargs`` as a new dict, Glasswall policy objects in
    either as their ``.text``. Unlike Glasswall, a ``func`` that is not callable (or ``args`` given
    as one string) raises ``TypeError`` here, not later inside the worker.
    """

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Absolute paths this task alone may write under ``isolation="strict"``, on top of the
    #: manager's ``Isolation.read_write_paths`` (``sandboxrun batch``: the task's own staging
    #: folder, so no task can write into a neighbour's). Not part of equality or hash.
    read_write_paths: tuple[str, ...] = ()
    #: Run by the launcher in the manager just before this task's process starts (see
    #: ``LaunchHook``); None for every task but ``sandboxrun batch``'s.
    _launch_hook: LaunchHook | None = None

    def __init__(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not callable(func):
            raise TypeError(f"Task func must be callable, got {type(func).__name__}: {func!r:.80}")
        self.func = func
        self.args = _arguments(args)
        self.kwargs = _keyword_arguments(kwargs)

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
        # Glasswall prints func.__name__; a callable without one (functools.partial, an
        # instance with __call__) gets its repr here instead of an AttributeError.
        name = getattr(self.func, "__name__", None) or repr(self.func)
        args = ", ".join(_short(arg) for arg in self.args)
        kwargs = ", ".join(f"{key}={_short(value)}" for key, value in self.kwargs.items())
        return f"{type(self).__name__}(func={name}, args=({args}), kwargs=({kwargs}))"


@dataclasses.dataclass(eq=False)
class TaskResult:
    """The outcome of one task. The first 13 fields are the Glasswall manager's, same meanings.

    Beyond the seed: ``exit_code`` is never ``None`` once the process ended (negative = killed by
    that signal), ``exception`` is never ``None`` when ``success`` is False, and every field is
    always present (Glasswall leaves out ``timed_out`` and ``max_memory_used_in_gib``/
    ``out_of_memory`` when that limit is unset), ``max_memory_used_in_gib`` filled with or without
    a limit (``None`` only when nothing measured it: the sandbox's counters could not be read and
    no result frame came).

    A limit hit: ``success`` False, that limit's flag True and ``exception`` naming it --
    ``timed_out`` (``TimeoutError``), ``out_of_memory`` (``MemoryError``),
    ``cpu_time_limit_exceeded`` (``CpuTimeLimitExceeded``), ``process_limit_exceeded``
    (``ProcessLimitExceeded``: pids.max refused a fork or thread -- ``RuntimeError: can't
    start new thread``, ``BlockingIOError`` from fork, kept as its ``__cause__`` -- and the task
    failed, or the polled count went over and it was killed). A task whose worker never started
    (its sandbox, its zygote, a memory limit too small to start in) has ``exit_code`` None and a
    ``SandboxrunError`` saying what to do.
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
    # Under a cpu_quota, where the kernel counts it (cpu.stat): the CFS periods in which the
    # task was throttled, and for how long in all. None: not measured.
    cpu_throttled_periods: int | None = None
    cpu_throttled_seconds: float | None = None
    #: The isolation profile the task ran under ("none", "default", "strict", "custom").
    isolation: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskResult):
            return NotImplemented
        mine = (self.task, self.success, self.result, self.exception)
        return mine == (other.task, other.success, other.result, other.exception)

    def __hash__(self) -> int:
        return hash((self.task, self.success))

    def __repr__(self) -> str:
        fields = ", ".join(
            _field(field.name, getattr(self, field.name)) for field in dataclasses.fields(self)
        )
        return f"{type(self).__name__}({fields})"
