"""Which types a task's result may contain: the restricted unpickler for result-frame bodies.

A worker is untrusted (the input file may own it), and a pickle stream is a program: GLOBAL /
STACK_GLOBAL name any callable, REDUCE calls it. ``pickle.loads`` on a worker's body would let
the task run ``os.system`` in the manager. Here the only way a stream reaches a callable is
``find_class``, which returns, for exactly the names the protocol-5 pickle of each type uses:

    builtins.complex, range, slice; datetime.date,    the class itself: immutable, fixed-size,
    time, datetime, timedelta, timezone; uuid.UUID     any arguments only build a value (UUID is
                                                       a Python class: NEWOBJ needs the class)
    builtins.list, tuple, dict, set, frozenset,        a stand-in that refuses to be called:
    bytes, bytearray, str, int, float, bool            protocol 5 names them only as a
                                                       defaultdict's default_factory
    pathlib.PurePath, PurePosixPath, PureWindowsPath,  a stand-in that checks the arguments
    Path, PosixPath, WindowsPath; decimal.Decimal;     have the shape the class's own reduce
    fractions.Fraction; collections.OrderedDict,       gives (str parts; one str; two ints; no
    defaultdict, Counter, deque                        argument; a factory; one dict; an empty
                                                       sequence and a maxlen), then builds it
    enum classes (Enum, IntEnum, Flag, ...) of         a stand-in that takes one value and looks
    modules already imported                           the member up (no _missing_ of the
                                                       module's own, Flag values within the
                                                       members' bits)
    namedtuple classes of modules already imported     the class: its __new__ is the one
                                                       collections.namedtuple generated (checked
                                                       by its code), no hooks added
    any BaseException subclass of a module already     the class (exception groups: a stand-in
    imported                                           that wants a list or tuple of exceptions)
    the classes the user allowed                       the class, by exact module.qualname
                                                       (``__main__`` and ``__mp_main__`` alike)
    sandboxrun._command.CommandResult                  what CommandTask returns

"Already imported" is a dict look-up in ``sys.modules`` and the module's ``__dict__``: never an
import, never a module ``__getattr__``. Everything else is refused with ``ResultTypeRefused``
(naming the type and the option that allows it). Why the stand-ins:

- default_factory is a callable the task chooses and the manager calls later (``d[missing]``):
  it must be None or a class accepted here (exception, enum and namedtuple classes are not);
- copying constructors would let a small stream build a huge value: ``bytearray(10**11)``,
  ``set(range(10**12))``, or one memoized large list handed to ``frozenset`` a million times.
  So the builtin containers are never called, and every checked constructor that copies its
  argument (path parts, the digits of a Decimal or Fraction, a Counter's dict, an exception
  group's list) is charged against a budget of a few times the stream's length;
- ``Fraction("1e999999999")`` would compute 10**999999999: only what ``__reduce__`` gives;
- an enum member is a singleton of the manager: BUILD on it would change it for everyone (see
  below), and ``_missing_`` / ``__eq__`` / ``__hash__`` of a module's own would run its code;
- a stand-in is not the class: one found as a plain value (not as a default_factory) in the
  decoded result is refused rather than handed over in its place.

Other ways into the pickle machine are closed too:

- ``persistent_load`` refuses; out-of-band buffers are not passed (NEXT_BUFFER fails);
- EXT1/2/4 codes: the C unpickler serves them from ``copyreg._extension_cache`` *without*
  asking ``find_class``; that cache is empty unless the process registered extensions, and then
  the stream is scanned for EXT opcodes first and refused if it has any;
- BUILD with "slot state" on a *class* (not an instance) would ``setattr`` on that class: the
  builtin value types are immutable, stand-ins refuse ``setattr`` and exception classes route
  BUILD to ``BaseException.__setstate__`` (which refuses a class), but an allowed Python class
  (or a namedtuple class, or UUID) would be monkeypatched for the rest of the manager's life.
  When the stream has a BUILD opcode, each mutable class ``find_class`` hands out is snapshotted
  then, and each enum member a stand-in hands out too; if one changed, it is restored and the
  result refused;
- NEWOBJ / NEWOBJ_EX call ``cls.__new__`` and REDUCE calls ``cls(*args)``, with ``cls`` from
  ``find_class``: allowing a class means trusting its constructor, ``__setstate__``,
  ``append``/``extend``/``__setitem__``, ``__hash__``/``__eq__`` with arguments the task chooses
  (exceptions: their ``__init__`` and ``BaseException.__setstate__``, a plain attribute update).
  Namedtuple and enum classes of a module are accepted by default only without such methods of
  the module's own (else: allow them by name).

Refused on purpose, decided by test: the worker always pickles with protocol 5. Protocol 0-2
streams of ``bytes`` need ``_codecs.encode`` (a codec look-up can import an ``encodings``
module), old-style objects need ``copyreg._reconstructor``, and old sets call ``builtins.set``:
none is accepted. ``zoneinfo.ZoneInfo`` pickles through ``builtins.getattr`` (never given
out) as ``ZoneInfo._unpickle(key)``, which reads the file the task names from the tz search
path (``..`` and absolute keys are refused there, the read is not) and, when it is not found,
imports the ``tzdata`` package: a datetime with a ZoneInfo tzinfo is refused (send the key as a
str); ``datetime.timezone`` offsets pass.

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

import builtins
import collections
import copyreg
import datetime
import decimal
import enum
import fractions
import functools
import io
import logging
import operator
import pathlib
import pickle
import pickletools
import re
import sys
import types
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ._command import CommandResult
from ._errors import ResultDecodeError, ResultTypeRefused

log = logging.getLogger("sandboxrun.results")

# Found as they are: immutable (or, UUID, guarded) and built to a fixed size whatever the args.
_PLAIN_TYPES: tuple[type, ...] = (
    complex, range, slice,
    datetime.date, datetime.time, datetime.datetime, datetime.timedelta, datetime.timezone,
    uuid.UUID,
)  # fmt: skip
_SANDBOXRUN_TYPES: tuple[type, ...] = (CommandResult,)
# Named by a protocol-5 stream only as a defaultdict's default_factory; never called.
_FACTORY_ONLY: tuple[type, ...] = (
    list, tuple, dict, set, frozenset, bytes, bytearray, str, int, float, bool,
)  # fmt: skip
_PATH_TYPES: tuple[type, ...] = (
    pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath,
)  # fmt: skip
_EXCEPTION_GROUP: type | None = getattr(builtins, "BaseExceptionGroup", None)  # 3.11+
_MAIN_NAMES = ("__main__", "__mp_main__")  # the manager's script; spawn/zygote re-import it

_SMALL = 1 << 20  # smaller bodies are copied into a BytesIO: C calls beat Python read() calls
_BUILD = pickle.BUILD
_EXT_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})
_TYPE_DICT = type.__dict__["__dict__"]  # a class's own namespace, bypassing any metaclass
_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
# Units (characters, items, bytes) the copying constructors may produce: honest streams carry
# each copied argument once, so a few times the stream's length, plus slack for repeated path
# parts (the pickler memoizes equal strings).
_BUDGET_PER_BYTE = 4
_BUDGET_SLACK = 1 << 16
# str(Fraction) as 3.10 pickles it: no exponent, so no 10**exp to compute.
_FRACTION_TEXT = re.compile(r"-?[0-9]+(/[0-9]+)?")

# Methods the unpickler (or the checked constructors) may call on a class or its instances with
# task-chosen arguments: a namedtuple or enum class that defines one of these itself runs its
# own code, so it is accepted only when allowed by name.
_INSTANCE_HOOKS = frozenset({
    "__setstate__", "__setattr__", "__delattr__", "__getattr__", "__getattribute__",
    "__setitem__", "append", "extend", "__hash__", "__eq__", "__del__",
    "__index__", "__int__", "__float__", "__complex__",
})  # fmt: skip
_NAMEDTUPLE_HOOKS = _INSTANCE_HOOKS | {"__new__", "__init__"}
_ENUM_HOOKS = _INSTANCE_HOOKS | {"_missing_"}
_NAMEDTUPLE_GLOBALS = frozenset({"_tuple_new", "__builtins__", "__name__"})


def _name_of(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _module(name: str) -> types.ModuleType | None:
    found = sys.modules.get(name)
    if found is None and name == "__mp_main__":
        # The zygote, spawn and forkserver import the manager's script as __mp_main__; here it
        # is __main__ (multiprocessing's own children alias the two the same way).
        found = sys.modules.get("__main__")
    return found if isinstance(found, types.ModuleType) else None


def _imported(module: str, name: str) -> object:
    """The object ``module.name`` if that module is already imported, else None.

    Plain dict look-ups only: ``getattr`` could run a module ``__getattr__`` (lazy imports) or a
    metaclass ``__getattribute__``; ``object.__getattribute__`` also keeps a lazy module
    (``importlib.util.LazyLoader``) from loading itself.
    """
    found: object = _module(module)
    if found is None:
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


def _named_as(cls: type, module: str, name: str) -> bool:
    """The class's own name is the stream's (not reached through another module's import)."""
    own_module, own_name = _name_of(cls)
    if own_module in _MAIN_NAMES and module in _MAIN_NAMES:
        own_module = module
    return own_module == module and own_name == name


def _own_hooks(cls: type, hooks: frozenset[str]) -> set[str]:
    return {name for name in _TYPE_DICT.__get__(cls) if name in hooks}


def _is_plain_namedtuple(cls: type) -> bool:
    """A class collections.namedtuple (or typing.NamedTuple) made, maybe subclassed, with no
    hook of its own: its __new__ is the generated ``_tuple_new(_cls, (fields...))`` and
    nothing else (checked by the function's globals and the names its code uses)."""
    if type(cls) is not type:  # a metaclass could have a __call__
        return False
    mro = cls.__mro__
    if len(mro) < 3 or mro[-2] is not tuple or mro[-1] is not object:
        return False
    generated = mro[-3]
    for klass in mro[:-2]:
        if type(klass) is not type:
            return False
        hooks = _own_hooks(klass, _NAMEDTUPLE_HOOKS)
        if klass is generated:
            hooks.discard("__new__")
        if hooks:
            return False
    namespace = _TYPE_DICT.__get__(generated)
    new = namespace.get("__new__")
    if type(new) is staticmethod:  # how a class body's __new__ is stored
        new = new.__func__
    if type(namespace.get("_fields")) is not tuple or type(new) is not types.FunctionType:
        return False
    scope = new.__globals__
    return (
        scope.keys() == _NAMEDTUPLE_GLOBALS
        and scope["_tuple_new"] is tuple.__new__
        and type(scope["__builtins__"]) is dict
        and not scope["__builtins__"]
        and new.__code__.co_names == ("_tuple_new",)
        and new.__closure__ is None
    )


def _is_plain_enum(cls: type) -> bool:
    """An enum class with no hook of its own: calling it with one value is a member look-up
    (``Enum.__new__`` on ``_value2member_map_``, then the stdlib ``_missing_``)."""
    if type(cls) is not enum.EnumMeta or not issubclass(cls, enum.Enum):
        return False
    for klass in cls.__mro__:
        if klass.__module__ in ("enum", "builtins"):
            continue
        if type(klass) not in (type, enum.EnumMeta) or _own_hooks(klass, _ENUM_HOOKS):
            return False
        new = _TYPE_DICT.__get__(klass).get("__new__")
        if new is not None and new is not enum.Enum.__new__:
            return False
    return True


def _flag_bits(cls: type) -> int:
    members = _TYPE_DICT.__get__(cls).get("_member_map_", {})
    return functools.reduce(operator.or_, (m._value_ for m in members.values()), 0)


class _Load:
    """One load's state: its budget, the stand-ins it made, and what it snapshotted."""

    __slots__ = ("budget", "classes", "factories", "guarding", "made", "members")

    def __init__(self, size: int, guarding: bool, factories: dict[int, type]) -> None:
        self.budget = size * _BUDGET_PER_BYTE + _BUDGET_SLACK
        self.guarding = guarding
        self.factories = factories
        self.made: list[_StandIn] = []
        self.classes: dict[type, dict[str, object]] = {}
        self.members: list[tuple[object, dict[str, object]]] = []

    def charge(self, units: int, name: str) -> None:
        self.budget -= units
        if self.budget < 0:
            raise ResultDecodeError(
                f"the result would expand to more than {_BUDGET_PER_BYTE}x its stream in"
                f" copies ({name}); refused"
            )

    def guard_class(self, cls: type) -> None:
        if self.guarding and not cls.__flags__ & _IMMUTABLE_TYPE and cls not in self.classes:
            self.classes[cls] = _TYPE_DICT.__get__(cls).copy()

    def guard_member(self, member: object) -> None:
        if self.guarding:
            self.members.append((member, object.__getattribute__(member, "__dict__").copy()))

    def restore(self) -> str | None:
        """The first class or enum member the stream changed (now put back), or None."""
        changed = None
        for cls, saved in self.classes.items():
            if not _restore_class(cls, saved):
                changed = changed or f"the class {cls.__module__}.{cls.__qualname__}"
        for member, saved in self.members:
            now = object.__getattribute__(member, "__dict__")
            if not _same(now, saved):
                now.clear()
                now.update(saved)
                kind = type(member)
                changed = changed or f"the enum member {kind.__module__}.{kind.__qualname__}"
        return changed

    def leaked(self) -> _StandIn | None:
        """A stand-in the decoded value holds (a class object as a value: not the class)."""
        # What references a stand-in still held only by ``made`` (the unpickler and its memo
        # are gone): the list, the loop variable and getrefcount's argument; a probe held the
        # same way gives that count on this interpreter.
        for probe in [object()]:
            expected = sys.getrefcount(probe)
        for stand_in in self.made:
            if sys.getrefcount(stand_in) > expected:
                return stand_in
        return None


def _same(now: dict[str, object], saved: dict[str, object]) -> bool:
    # Identity only (``==`` could call a value's __eq__, which the stream may have set).
    return (
        len(now) == len(saved)
        and all(map(operator.is_, now, saved))
        and all(map(operator.is_, now.values(), saved.values()))
    )


def _restore_class(cls: type, saved: dict[str, object]) -> bool:
    now = _TYPE_DICT.__get__(cls)
    if _same(now, saved):
        return True
    for key in [key for key in now if key not in saved]:
        type.__delattr__(cls, key)
    for key, value in saved.items():
        if now.get(key, saved) is not value:
            type.__setattr__(cls, key, value)
    return False


_Build = Callable[["_StandIn", tuple[object, ...]], object]


class _StandIn:
    """What ``find_class`` gives out for a class whose construction is checked (REDUCE calls
    it with the stream's arguments). Immutable: BUILD on it must not redirect it."""

    __slots__ = ("_build", "cls", "factory", "load", "name")
    cls: type
    name: str
    factory: bool  # may be a defaultdict's default_factory (then the class itself is used)
    load: _Load
    _build: _Build

    def __init__(self, cls: type, name: str, build: _Build, load: _Load, factory: bool) -> None:
        for key, value in (("cls", cls), ("name", name), ("_build", build), ("load", load)):
            object.__setattr__(self, key, value)
        object.__setattr__(self, "factory", factory)

    def __setattr__(self, key: str, value: object) -> None:
        raise ResultTypeRefused(self.name, "a stream tried to change what it names", False)

    def __call__(self, *args: object) -> object:
        return self._build(self, args)

    def refuse(self, why: str) -> ResultTypeRefused:
        return ResultTypeRefused(self.name, why, False)


def _never(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    raise stand_in.refuse("protocol 5 never calls it; only a defaultdict's factory may name it")


def _path(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if not all(type(part) is str for part in args):
        raise stand_in.refuse("a path is built from str parts only")
    stand_in.load.charge(sum(map(len, args)), stand_in.name)  # type: ignore[arg-type]
    return stand_in.cls(*args)


def _decimal(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if len(args) != 1 or type(args[0]) is not str:
        raise stand_in.refuse("a Decimal is built from one str only (no context)")
    stand_in.load.charge(len(args[0]), stand_in.name)
    return stand_in.cls(args[0])


def _fraction(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if len(args) == 2 and type(args[0]) is int and type(args[1]) is int and args[1] > 0:
        stand_in.load.charge((args[0].bit_length() + args[1].bit_length()) // 8, stand_in.name)
    elif len(args) == 1 and type(args[0]) is str and _FRACTION_TEXT.fullmatch(args[0]):
        stand_in.load.charge(len(args[0]), stand_in.name)
    else:
        raise stand_in.refuse("a Fraction is built from two ints (or 'n/d') only")
    return stand_in.cls(*args)


def _no_arguments(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if args:
        raise stand_in.refuse("its items come after it is built, never as arguments")
    return stand_in.cls()


def _counter(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if not args:
        return stand_in.cls()
    if len(args) != 1 or type(args[0]) is not dict:
        raise stand_in.refuse("a Counter is built from one dict only")
    stand_in.load.charge(len(args[0]), stand_in.name)
    return stand_in.cls(args[0])


def _deque(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    items = args[0] if args else ()
    maxlen = args[1] if len(args) == 2 else None
    if (
        len(args) > 2
        or type(items) not in (list, tuple)
        or items
        or not (maxlen is None or (type(maxlen) is int and maxlen >= 0))
    ):
        raise stand_in.refuse("a deque is built empty (with its maxlen), its items come after")
    return stand_in.cls((), maxlen)


def _defaultdict(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    factory = args[0] if args else None
    if len(args) > 1:
        raise stand_in.refuse("its items come after it is built, never as arguments")
    if type(factory) is _StandIn and factory.factory:
        factory = factory.cls
    elif factory is not None and stand_in.load.factories.get(id(factory)) is not factory:
        raise stand_in.refuse(
            "its default_factory must be None or a class accepted here (the manager would call"
            " it): not an exception, enum or namedtuple class, nor any other callable"
        )
    return stand_in.cls(factory)


def _exception_group(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if len(args) >= 2:
        if type(args[1]) not in (list, tuple):
            raise stand_in.refuse("an exception group takes a list or tuple of exceptions")
        stand_in.load.charge(len(args[1]), stand_in.name)  # type: ignore[arg-type]
    return stand_in.cls(*args)


def _enum_member(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    cls = stand_in.cls
    if len(args) != 1:  # two or more would be the functional API: a new enum class
        raise stand_in.refuse("an enum member is looked up by one value")
    value = args[0]
    # Flag._missing_ makes and caches a member for a combination: only of the members' own
    # bits, so a stream cannot fill the class's cache with arbitrary values.
    if issubclass(cls, enum.Flag) and (
        type(value) is not int or value < 0 or value & ~_flag_bits(cls)
    ):
        raise stand_in.refuse("a flag value outside its members' bits")
    return _enum_lookup(stand_in, value)


def _allowed_enum_member(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    if len(args) != 1:
        raise stand_in.refuse("an enum member is looked up by one value")
    return _enum_lookup(stand_in, args[0])


def _member_by_name(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    """``builtins.getattr(EnumClass, "NAME")``: how enum members pickle on some CPython 3.11
    releases (3.11.2 here in the guest; later ones pickle ``(cls, (value,))``). Only a member
    name of an enum class this stream was given (a stand-in: plain or allowed) is looked up."""
    if len(args) != 2 or type(args[0]) is not _StandIn or type(args[1]) is not str:
        raise stand_in.refuse("getattr only looks up a member of an enum class by its name")
    enum_stand_in, name = args[0], args[1]
    cls = enum_stand_in.cls
    if not isinstance(cls, enum.EnumMeta) or enum_stand_in._build not in _ENUM_BUILDS:
        raise stand_in.refuse("getattr only looks up a member of an enum class by its name")
    member = cls.__members__.get(name)  # a dict look-up: no descriptor, no __getattr__
    if member is None:
        raise stand_in.refuse(f"{enum_stand_in.name} has no member {name!r}")
    stand_in.load.guard_member(member)
    return member


def _flag_or(stand_in: _StandIn, args: tuple[object, ...]) -> object:
    """``_operator.or_(a, b)``: how a combination of flags pickles where members pickle by
    name. Only two members of one plain Flag class, combined within its members' bits."""
    if len(args) != 2:
        raise stand_in.refuse("or_ only combines two members of one flag class")
    first, second = args
    cls = type(first)
    if (
        not isinstance(first, enum.Flag)
        or not isinstance(second, enum.Flag)
        or type(second) is not cls
        or not _is_plain_enum(cls)
        or cls.__members__.get(str(first.name)) is not first
    ):
        raise stand_in.refuse("or_ only combines two members of one flag class")
    member = cls(first.value | second.value)
    stand_in.load.guard_member(member)
    return member


def _enum_lookup(stand_in: _StandIn, value: object) -> object:
    member = stand_in.cls(value)
    stand_in.load.guard_member(member)  # a singleton: BUILD on it would change it for everyone
    return member


_CHECKED: dict[type, _Build] = {
    **dict.fromkeys(_FACTORY_ONLY, _never),
    **dict.fromkeys(_PATH_TYPES, _path),
    decimal.Decimal: _decimal,
    fractions.Fraction: _fraction,
    collections.OrderedDict: _no_arguments,
    collections.defaultdict: _defaultdict,
    collections.Counter: _counter,
    collections.deque: _deque,
}
_CHECKED_NAMES: dict[tuple[str, str], type] = {_name_of(cls): cls for cls in _CHECKED}
_ENUM_BUILDS = (_enum_member, _allowed_enum_member)
#: Callables some CPython 3.11 releases pickle enum members with, each checked as above.
_ENUM_HELPERS: dict[tuple[str, str], _Build] = {
    ("builtins", "getattr"): _member_by_name,
    ("_operator", "or_"): _flag_or,
}


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
    def __init__(self, file: io.BytesIO | _ViewReader, rules: ResultTypes, load: _Load) -> None:
        super().__init__(file, fix_imports=False)
        self._rules = rules
        self._load = load

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise ResultTypeRefused(f"{module!r}.{name!r}", "not a name", False)
        key = (module, name)
        checked = _CHECKED_NAMES.get(key)
        if checked is not None:  # `is not None`, not truth: a metaclass __bool__ would be a call
            return self._stand_in(checked, _CHECKED[checked], factory=True)
        helper = _ENUM_HELPERS.get(key)
        if helper is not None:  # never the real callable: a stand-in that checks its arguments
            return self._stand_in(enum.Enum, helper, factory=False, name=".".join(key))
        allowed = self._rules._allowed.get(key)
        if allowed is not None:
            if isinstance(allowed, enum.EnumMeta):
                return self._stand_in(allowed, _allowed_enum_member, factory=False)
            self._load.guard_class(allowed)
            return allowed
        found = _imported(module, name)
        if isinstance(found, type):
            if issubclass(found, BaseException):
                if _EXCEPTION_GROUP is not None and issubclass(found, _EXCEPTION_GROUP):
                    return self._stand_in(found, _exception_group, factory=False)
                return found
            if _named_as(found, module, name):
                if _is_plain_enum(found):
                    return self._stand_in(found, _enum_member, factory=False)
                if _is_plain_namedtuple(found):
                    self._load.guard_class(found)
                    return found
        raise ResultTypeRefused(f"{module}.{name}", *_why_refused(module, name, found))

    def _stand_in(
        self, cls: type, build: _Build, *, factory: bool, name: str | None = None
    ) -> _StandIn:
        name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
        stand_in = _StandIn(cls, name, build, self._load, factory)
        self._load.made.append(stand_in)
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise ResultTypeRefused("persistent_load", "persistent ids are never accepted", False)


def _why_refused(module: str, name: str, found: object) -> tuple[str, bool]:
    """(reason, whether allowed_result_types could allow it)."""
    if _module(module) is None:
        return f"module {module!r} is not imported in the manager, and a result never imports", True
    if found is None:
        return "no such class in that module", False
    if not isinstance(found, type):
        return f"a {type(found).__name__}, not a class: only classes can be allowed", False
    if not _named_as(found, module, name):
        own = ".".join(_name_of(found))
        return f"that is {own}, reached under another name", False
    if isinstance(found, enum.EnumMeta) or issubclass(found, tuple):
        return "an enum or namedtuple class with methods of its own that unpickling calls", True
    return "not a value type, an exception class, or an allowed type", True


def _has_ext_opcode(data: memoryview) -> bool:
    try:
        return any(op.name in _EXT_OPCODES for op, _, _ in pickletools.genops(io.BytesIO(data)))
    except Exception:  # unparsable: the real load will say what is wrong
        return False


class ResultTypes:
    """The result-type rules of one manager; ``loads`` decodes one result or exception body.

    ``allowed`` adds classes (by their ``__module__`` and ``__qualname__``; a class of the
    manager's ``__main__`` also under ``__mp_main__``, the name its script has in the zygote and
    under spawn and forkserver); ``trusted=True`` turns every check off (plain ``pickle.loads``:
    a task can then run code in the manager). Listing a type that is checked by default (a
    builtin container, a path, Decimal, ...) keeps its checks.
    """

    __slots__ = ("_allowed", "_factories", "trusted")

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
        self._allowed: dict[tuple[str, str], type] = {}
        for cls in (*_PLAIN_TYPES, *_SANDBOXRUN_TYPES, *classes):
            module, name = _name_of(cls)
            for alias in _MAIN_NAMES if module in _MAIN_NAMES else (module,):
                if (alias, name) not in _CHECKED_NAMES:
                    self._allowed[alias, name] = cls
        # What a defaultdict may call: the classes given out as they are, and the checked ones
        # (their stand-ins are replaced by the class). Keyed by id: no __hash__ of a stream's
        # object is called to look one up.
        factories = [*self._allowed.values(), *_CHECKED]
        self._factories = {id(cls): cls for cls in factories if not isinstance(cls, enum.EnumMeta)}

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
        file: io.BytesIO | _ViewReader
        if len(view) >= _SMALL:
            file, guarding = _ViewReader(view), True
        else:
            data = bytes(view)
            # No BUILD opcode: no class or member can be changed, nothing to snapshot.
            file, guarding = io.BytesIO(data), _BUILD in data
        load = _Load(len(view), guarding, self._factories)
        try:
            value = _RestrictedUnpickler(file, self, load).load()
        finally:  # the unpickler (and its memo) is gone here: see _Load.leaked
            changed = load.restore()
            if changed is not None:
                log.warning("a task's result changed %s; undone, result refused", changed)
                raise ResultDecodeError(
                    f"the task's result tried to change {changed} itself (undone);"
                    " the result is refused"
                )
        try:
            leaked = load.leaked()
            if leaked is not None:
                raise ResultTypeRefused(
                    leaked.name,
                    "a class object as a value (only a defaultdict's factory may be one)",
                    False,
                )
        finally:
            load.made.clear()  # stand-ins refer to the load: no cycle left for the collector
        return value


def loads(
    data: bytes | bytearray | memoryview, *, allowed: Iterable[type] = (), trusted: bool = False
) -> Any:
    """One-off form of ``ResultTypes(allowed, trusted=trusted).loads(data)``."""
    return ResultTypes(allowed, trusted=trusted).loads(data)
