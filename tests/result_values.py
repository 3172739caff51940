"""Values of the types a result may contain by default, built in a task (module level, so the
manager has this module -- and its namedtuple and enum classes -- imported, as a real caller
has), and look-alikes that must stay refused."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import pathlib
import typing
import uuid
from collections.abc import Callable

Point = collections.namedtuple("Point", "x y")


class Point3(typing.NamedTuple):
    x: int
    y: int
    z: int = 0

    def norm(self) -> int:  # a plain method: not a hook the unpickler calls
        return abs(self.x) + abs(self.y) + abs(self.z)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


CALLS: list[str] = []  # what a look-alike's own code would record if the manager ran it


class HookedPoint(collections.namedtuple("HookedPoint", "x y")):
    """A namedtuple whose class defines a hook the unpickler calls (on a dict key: __hash__)."""

    __slots__ = ()

    def __hash__(self) -> int:
        CALLS.append("HookedPoint.__hash__")
        return 0


class FakeTuple(tuple):  # type: ignore[type-arg]
    """Looks like a namedtuple (a tuple subclass with _fields) but its __new__ is its own."""

    _fields = ("a",)

    def __new__(cls, *args: object) -> FakeTuple:
        CALLS.append("FakeTuple.__new__")
        return super().__new__(cls, args)


class Lenient(enum.Enum):
    """An enum whose _missing_ is its own code (run on any value a stream names)."""

    A = "a"

    @classmethod
    def _missing_(cls, value: object) -> Lenient:
        CALLS.append("Lenient._missing_")
        return cls.A


def _defaultdict() -> collections.defaultdict[str, list[int]]:
    value: collections.defaultdict[str, list[int]] = collections.defaultdict(list)
    value["a"].append(1)
    return value


def _nested_defaultdict() -> collections.defaultdict[str, collections.Counter[str]]:
    value: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    value["a"]["b"] += 2
    return value


UTC2 = datetime.timezone(datetime.timedelta(hours=2), "X")

#: name -> a function building the value (called in the task and in the test, compared by ==).
VALUES: dict[str, Callable[[], object]] = {
    "PurePath": lambda: pathlib.PurePath("a/b"),
    "PurePosixPath": lambda: pathlib.PurePosixPath("/etc", "passwd"),
    "PureWindowsPath": lambda: pathlib.PureWindowsPath("C:/Users/x"),
    "Path": lambda: pathlib.Path("/tmp/out.pdf"),
    "PosixPath": lambda: pathlib.PosixPath("relative/dir/"),
    "date": lambda: datetime.date(2026, 12, 3),
    "time": lambda: datetime.time(7, 59, 1, 5, tzinfo=datetime.timezone.utc),
    "datetime": lambda: datetime.datetime(2026, 12, 3, 7, 59, tzinfo=UTC2, fold=1),
    "naive datetime": lambda: datetime.datetime(2000, 1, 1),
    "timedelta": lambda: datetime.timedelta(days=-3, microseconds=7),
    "timezone": lambda: UTC2,
    "utc": lambda: datetime.timezone.utc,
    "Decimal": lambda: decimal.Decimal("-1.2300E+5"),
    "Decimal inf": lambda: decimal.Decimal("-Infinity"),
    "Fraction": lambda: fractions.Fraction(-(2**80), 3),
    "UUID": lambda: uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "UUID safe": lambda: uuid.UUID(int=7, is_safe=uuid.SafeUUID.safe),
    "SafeUUID": lambda: uuid.SafeUUID.unsafe,
    "OrderedDict": lambda: collections.OrderedDict([("b", 1), ("a", [2])]),
    "defaultdict": _defaultdict,
    "defaultdict None": lambda: collections.defaultdict(None, {1: 2}),
    "defaultdict of Counter": _nested_defaultdict,
    "defaultdict of Decimal": lambda: collections.defaultdict(decimal.Decimal),
    "Counter": lambda: collections.Counter("abracadabra"),
    "deque": lambda: collections.deque([1, "x", (2,)]),
    "deque maxlen": lambda: collections.deque(range(10), maxlen=3),
    "namedtuple": lambda: Point(1, [2]),
    "NamedTuple": lambda: Point3(1, 2),
    "Enum": lambda: Color.GREEN,
    "IntEnum": lambda: Level.HIGH,
    "Flag": lambda: Perm.R | Perm.X,
    "Flag empty": lambda: Perm(0),
    "range": lambda: range(3, 10**20, 7),
    "slice": lambda: slice(1, None, -1),
    "complex": lambda: complex(1.5, -2),
    "bytearray": lambda: bytearray(b"\x00\xff"),
    "set": lambda: {1, "a", (2,)},
    "frozenset": lambda: frozenset({frozenset({1})}),
    "all in one": lambda: {
        "path": pathlib.Path("/x"),
        "when": datetime.datetime(2026, 1, 1),
        "points": [Point(1, 2), Point(1, 2)],
        Color.RED: collections.Counter(a=1),
        "id": uuid.UUID(int=1),
    },
}


def make(name: str) -> object:
    """The task: build one of VALUES in the worker."""
    return VALUES[name]()


def make_hostile(name: str) -> object:
    """A task returning a look-alike (refused in the manager)."""
    return {"FakeTuple": lambda: FakeTuple(1), "HookedPoint": lambda: {HookedPoint(1, 2): 1},
            "Lenient": lambda: Lenient.A}[name]()  # fmt: skip
