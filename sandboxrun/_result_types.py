"""Which types a task's result may contain: the restricted unpickler for result-frame bodies.

A worker is untrusted (the input file may own it), and a pickle stream is a program: GLOBAL /
STACK_GLOBAL name any callable, REDUCE calls it. ``pickle.loads`` on a worker's body would let
the task run ``os.system`` in the manager. Here the only way a stream reaches a callable is
``find_class``, which returns:

    builtins.complex / set / frozenset / bytearray   value types (protocol 5 needs complex only)
    any BaseException subclass                        found by dict look-up in a module that is
                                                      already in sys.modules (never an import,
                                                      never a module __getattr__)
    the classes the user allowed                      exact module.qualname of each class
    sandboxrun._command.CommandResult                 what CommandTask returns

and refuses everything else with ``ResultTypeRefused`` (naming the type and the option that
allows it). Other ways into the pickle machine are closed too:

- ``persistent_load`` refuses; out-of-band buffers are not passed (NEXT_BUFFER fails);
- EXT1/2/4 codes: the C unpickler serves them from ``copyreg._extension_cache`` *without*
  asking ``find_class``; that cache is empty unless the process registered extensions, and then
  the stream is scanned for EXT opcodes first and refused if it has any;
- BUILD with "slot state" on a *class* (not an instance) would ``setattr`` on that class: the
  builtin value types are immutable and exception classes route BUILD to
  ``BaseException.__setstate__`` (which refuses a class), but an allowed Python class would be
  monkeypatched for the rest of the manager's life. Each load snapshots the namespaces of the
  mutable allowed classes and, if one changed, restores it and refuses the result;
- NEWOBJ / NEWOBJ_EX call ``cls.__new__`` and REDUCE calls ``cls(*args)``, with ``cls`` from
  ``find_class``: allowing a class means trusting its constructor, ``__setstate__``,
  ``append``/``extend``/``__setitem__`` with arguments the task chooses (exceptions: their
  ``__init__`` and ``BaseException.__setstate__``, a plain attribute update).

Refused on purpose, decided by test: the worker always pickles with protocol 5, whose value
types name no global but ``builtins.complex``. Protocol 0-2 streams of ``bytes`` need
``_codecs.encode`` (a codec look-up can import an ``encodings`` module) and old-style objects
need ``copyreg._reconstructor``: neither is accepted.

Speed: the C unpickler stays on its fast path, the subclass only overrides ``find_class``
(called once per global; the stream memoizes it). Bodies under 1 MiB are copied into a
``BytesIO``; larger ones are read through a small file object over the frame's memoryview, so a
256 MiB ``bytes`` result is copied once, as with ``pickle.loads`` (same CPU time, measured).

Nesting: not capped. The C unpickler is iterative and deallocation uses the trashcan, so a
200 000-deep list (600 KB of stream) loads and frees without harm; any failure at all
(garbage, truncation, MemoryError, RecursionError) becomes ``ResultDecodeError``. Such a value
can still raise RecursionError when someone ``repr()``s or compares it later, so the manager
must never ``repr`` a decoded value (name its type instead); a cap would need a Python walk
over every object of every result.
"""

from __future__ import annotations

import copyreg
import io
import logging
import operator
import pickle
import pickletools
import sys
import types
from collections.abc import Iterable
from typing import Any

from ._command import CommandResult
from ._errors import ResultDecodeError, ResultTypeRefused

log = logging.getLogger("sandboxrun.results")

_VALUE_TYPES: tuple[type, ...] = (complex, set, frozenset, bytearray)
_SANDBOXRUN_TYPES: tuple[type, ...] = (CommandResult,)
_SMALL = 1 << 20  # smaller bodies are copied into a BytesIO: C calls beat Python read() calls
_BUILD = pickle.BUILD
_EXT_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})
_TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, bypassing any metaclass


def _name_of(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _imported(module: str, name: str) -> object:
    """The object ``module.name`` if that module is already imported, else None.

    Plain dict look-ups only: ``getattr`` could run a module ``__getattr__`` (lazy imports) or a
    metaclass ``__getattribute__``; ``object.__getattribute__`` also keeps a lazy module
    (``importlib.util.LazyLoader``) from loading itself.
    """
    found: object = sys.modules.get(module)
    if not isinstance(found, types.ModuleType):
        return None
    namespace = object.__getattribute__(found, "__dict__")
    for part in name.split("."):
        if not isinstance(namespace, (dict, types.MappingProxyType)):
            return None
        found = namespace.get(part)
        namespace = _TYPE_DICT.__get__(found) if isinstance(found, type) else None
    return found


def _is_exception_class(found: object) -> bool:
    return isinstance(found, type) and issubclass(found, BaseException)


_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE


class _ClassGuard:
    """Undo (and report) any change a stream made to an allowed class's own namespace."""

    __slots__ = ("_classes",)

    def __init__(self, classes: Iterable[type]) -> None:
        self._classes = tuple(cls for cls in classes if not cls.__flags__ & _IMMUTABLE_TYPE)

    def snapshot(self) -> list[dict[str, object]]:
        return [_TYPE_DICT.__get__(cls).copy() for cls in self._classes]

    def restore(self, before: list[dict[str, object]]) -> str | None:
        """The first class that was changed (now put back), or None."""
        changed = None
        for cls, saved in zip(self._classes, before, strict=True):
            now = _TYPE_DICT.__get__(cls)
            # Identity only (``==`` could call a value's __eq__, which the stream may have set).
            if (
                len(now) == len(saved)
                and all(map(operator.is_, now, saved))
                and all(map(operator.is_, now.values(), saved.values()))
            ):
                continue
            changed = changed or f"{cls.__module__}.{cls.__qualname__}"
            for key in [key for key in now if key not in saved]:
                type.__delattr__(cls, key)
            for key, value in saved.items():
                if now.get(key, saved) is not value:
                    type.__setattr__(cls, key, value)
        return changed


class _ViewReader:
    """The file protocol the C unpickler needs, over a memoryview, without copying it whole."""

    __slots__ = ("_position", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        start = self._position
        stop = len(self._view) if size < 0 else min(len(self._view), start + size)
        self._position = stop
        return bytes(self._view[start:stop])

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as target, target.cast("B") as flat:
            start = self._position
            count = min(len(flat), len(self._view) - start)
            flat[:count] = self._view[start : start + count]
        self._position = start + count
        return count

    def readline(self) -> bytes:
        # Text opcodes (protocol 0) read lines; search in growing windows so a stream of many
        # short lines costs linear time, not a copy of the rest of the frame per line.
        start = searched = self._position
        window = 256
        while searched < len(self._view):
            stop = min(len(self._view), searched + window)
            found = bytes(self._view[searched:stop]).find(b"\n")
            if found >= 0:
                self._position = searched + found + 1
                return bytes(self._view[start : self._position])
            searched, window = stop, window * 2
        self._position = len(self._view)
        return bytes(self._view[start:])


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO | _ViewReader, allowed: dict[tuple[str, str], type]
    ) -> None:
        super().__init__(file, fix_imports=False)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise ResultTypeRefused(f"{module!r}.{name!r}", "not a name", False)
        found = self._allowed.get((module, name))
        if found is not None:  # `is not None`, not truth: a metaclass __bool__ would be a call
            return found
        imported = _imported(module, name)
        if _is_exception_class(imported):
            return imported
        raise ResultTypeRefused(f"{module}.{name}", *_why_refused(module, imported))

    def persistent_load(self, pid: Any) -> Any:
        raise ResultTypeRefused("persistent_load", "persistent ids are never accepted", False)


def _why_refused(module: str, found: object) -> tuple[str, bool]:
    """(reason, whether allowed_result_types could allow it)."""
    if module not in sys.modules:
        return f"module {module!r} is not imported in the manager, and a result never imports", True
    if found is None:
        return "no such class in that module", False
    if not isinstance(found, type):
        return f"a {type(found).__name__}, not a class: only classes can be allowed", False
    return "not a builtin value type, an exception class, or an allowed type", True


def _has_ext_opcode(data: memoryview) -> bool:
    try:
        return any(op.name in _EXT_OPCODES for op, _, _ in pickletools.genops(io.BytesIO(data)))
    except Exception:  # unparsable: the real load will say what is wrong
        return False


class ResultTypes:
    """The result-type rules of one manager; ``loads`` decodes one result or exception body.

    ``allowed`` adds classes (by their ``__module__`` and ``__qualname__``); ``trusted=True``
    turns every check off (plain ``pickle.loads``: a task can then run code in the manager).
    """

    __slots__ = ("_allowed", "_guard", "trusted")

    def __init__(self, allowed: Iterable[type] = (), *, trusted: bool = False) -> None:
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted_results must be True or False, got {trusted!r}")
        if isinstance(allowed, (str, bytes, type)):
            raise TypeError("allowed_result_types must be a list of classes")
        classes = list(allowed)
        for cls in classes:
            if not isinstance(cls, type):
                raise TypeError(
                    f"allowed_result_types takes classes, got {cls!r}"
                    " (a function or instance cannot be allowed; use trusted_results=True)"
                )
        self.trusted = trusted
        self._allowed = {_name_of(cls): cls for cls in (*_VALUE_TYPES, *_SANDBOXRUN_TYPES)}
        self._allowed.update((_name_of(cls), cls) for cls in classes)
        self._guard = _ClassGuard(self._allowed.values())

    def loads(self, data: bytes | bytearray | memoryview) -> Any:
        """The decoded value; ``ResultDecodeError`` (``ResultTypeRefused``) on any failure."""
        with memoryview(data) as view, view.cast("B") as flat:
            try:
                if self.trusted:
                    return pickle.loads(flat)
                if copyreg._extension_cache and _has_ext_opcode(flat):  # type: ignore[attr-defined]
                    raise ResultTypeRefused(
                        "copyreg extension code", "EXT opcodes are refused", False
                    )
                return self._restricted_load(flat)
            except ResultDecodeError:
                raise
            except (Exception, SystemExit, GeneratorExit) as error:
                # Anything a stream can make the unpickler raise is this task's failure only.
                raise ResultDecodeError(
                    f"the result could not be decoded: {type(error).__name__}: {error}"[:2000]
                ) from error

    def _restricted_load(self, view: memoryview) -> Any:
        if len(view) >= _SMALL:
            return self._guarded_load(_ViewReader(view))
        data = bytes(view)
        if _BUILD not in data:  # no BUILD opcode, no class can be changed: skip the guard
            return _RestrictedUnpickler(io.BytesIO(data), self._allowed).load()
        return self._guarded_load(io.BytesIO(data))

    def _guarded_load(self, file: io.BytesIO | _ViewReader) -> Any:
        before = self._guard.snapshot()
        try:
            return _RestrictedUnpickler(file, self._allowed).load()
        finally:
            changed = self._guard.restore(before)
            if changed is not None:
                log.warning("a task's result changed the class %s; undone, result refused", changed)
                raise ResultDecodeError(
                    f"the task's result tried to change the class {changed} itself (undone);"
                    " the result is refused"
                )


def loads(
    data: bytes | bytearray | memoryview, *, allowed: Iterable[type] = (), trusted: bool = False
) -> Any:
    """One-off form of ``ResultTypes(allowed, trusted=trusted).loads(data)``."""
    return ResultTypes(allowed, trusted=trusted).loads(data)
