"""The restricted unpickler for result bodies: no stream can run code in, import into, change or
crash the manager; the value types, exceptions and allowed classes come through intact."""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import dataclasses
import datetime
import enum
import importlib.util
import io
import ipaddress
import json
import mmap
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import uuid
import zoneinfo

import pytest

from sandboxrun import ProcessManager, Task
from sandboxrun._command import CommandFailed, CommandResult
from sandboxrun._errors import (
    CpuTimeLimitExceeded,
    ProcessLimitExceeded,
    RemoteError,
    ResultDecodeError,
    ResultNotPicklable,
    ResultTypeRefused,
    SandboxrunError,
    WorkerDied,
)
from sandboxrun._result_types import ResultTypes, loads

from . import result_values
from .hostile_bytes import variants


@dataclasses.dataclass
class MyResult:
    name: str
    size: int = 0


class Outer:
    class InnerError(Exception):
        pass


class _Calls:
    """``__reduce__`` that makes the unpickler call ``func(*args)``."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a stream ran a command in the manager"


def _refused(data: bytes, **options) -> ResultTypeRefused:
    with pytest.raises(ResultTypeRefused) as info:
        loads(data, **options)
    return info.value


# ---------------------------------------------------------------- what must pass


VALUES = [
    None, True, False, 0, -1, 2**200, 1.5, float("inf"), 1 + 2j, "text \udcff", b"\x00" * 10,
    bytearray(b"abc"), [1, [2, [3]]], (1, (2,)), {"a": {1: b"x"}}, {1, 2}, frozenset({3}),
    set(), frozenset(), [], {}, (),
]  # fmt: skip


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_builtin_values_round_trip(value):
    got = loads(pickle.dumps(value, protocol=5))
    assert type(got) is type(value)
    assert got == value or (got != got and value != value)


def test_exported_file_bytes_from_a_mmap_backed_frame():
    payload = os.urandom(3 << 20)  # over the small-body threshold: the memoryview reader
    data = pickle.dumps(payload, protocol=5)
    buffer = mmap.mmap(-1, len(data) + 7)
    buffer[7:] = data
    with memoryview(buffer) as view:
        assert loads(view[7:]) == payload
    buffer.close()


def test_large_protocol_0_stream_reads_lines_in_linear_time():
    value = list(range(300_000))
    data = pickle.dumps(value, protocol=0)
    assert len(data) > 1 << 20
    assert loads(data) == value


def test_builtin_exceptions_keep_their_args_and_state():
    error = OSError(2, "No such file", "/x")
    error.__notes__ = ["a note"]  # add_note() is 3.11+
    error.extra = [1, 2]
    got = loads(pickle.dumps(error, protocol=5))
    assert type(got) is FileNotFoundError
    assert (got.errno, got.strerror, got.filename) == (2, "No such file", "/x")
    assert got.__notes__ == ["a note"] and got.extra == [1, 2]
    assert loads(pickle.dumps(SystemExit(3), protocol=5)).code == 3
    group_type = getattr(builtins, "BaseExceptionGroup", None)
    if group_type is not None:  # 3.11+
        group = loads(pickle.dumps(group_type("g", [KeyError("k"), SystemExit(3)]), protocol=5))
        assert [type(e) for e in group.exceptions] == [KeyError, SystemExit]


def test_sandboxrun_errors_and_command_results_pass_by_default():
    result = CommandResult(["conv", "in"], 3, stdout=b"out", stderr=b"boom")
    for error in [
        RemoteError("m", "pkg.T", "text", "tb"),
        WorkerDied(-9, "cut off"),
        ResultNotPicklable("m", "pkg.T", "text", "tb"),
        CommandFailed(result),
        ProcessLimitExceeded("too many"),
        CpuTimeLimitExceeded("cpu"),
        ResultTypeRefused("os.system", "why", False),
    ]:
        got = loads(pickle.dumps(error, protocol=5))
        assert type(got) is type(error) and got.args == error.args
        assert vars(got) == vars(error)
    assert loads(pickle.dumps(result, protocol=5)) == result


def test_exception_classes_of_imported_modules_pass_nested_qualname_too():
    got = loads(pickle.dumps(subprocess.CalledProcessError(2, ["x"]), protocol=5))
    assert isinstance(got, subprocess.CalledProcessError) and got.returncode == 2
    inner = loads(pickle.dumps(Outer.InnerError("in"), protocol=5))
    assert type(inner) is Outer.InnerError and inner.args == ("in",)


def test_a_user_allowed_dataclass_passes_and_only_when_allowed():
    data = pickle.dumps([MyResult("a", 3)], protocol=5)
    assert loads(data, allowed=[MyResult]) == [MyResult("a", 3)]
    refused = _refused(data)
    assert refused.type_name == f"{__name__}.MyResult"
    message = str(refused)
    assert "allowed_result_types=[MyResult" in message and "trusted_results=True" in message
    assert refused.allowable
    assert isinstance(refused, SandboxrunError)


def test_allowing_a_stdlib_class_not_accepted_by_default():
    data = pickle.dumps(ipaddress.IPv4Address("10.0.0.1"), protocol=5)
    assert _refused(data).type_name == "ipaddress.IPv4Address"
    assert loads(data, allowed=[ipaddress.IPv4Address]) == ipaddress.IPv4Address("10.0.0.1")


def test_trusted_results_is_plain_pickle():
    try:
        value = datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("UTC"))
    except zoneinfo.ZoneInfoNotFoundError:  # no tz database (the guest has none)
        pytest.skip("no time zone data here")
    data = pickle.dumps(value, protocol=5)
    # getattr is an enum-member stand-in: ZoneInfo, which it would be handed, is refused
    assert _refused(data).type_name == "zoneinfo.ZoneInfo"
    assert loads(data, trusted=True) == value


@pytest.mark.parametrize("bad", [[len], "not a list", [MyResult("a")], MyResult])
def test_allowed_result_types_takes_classes_only(bad):
    with pytest.raises(TypeError):
        ResultTypes(bad)
    with pytest.raises(TypeError):
        ResultTypes(trusted=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- what must be refused


def test_os_system_reduce_is_refused_and_not_run(marker):
    data = pickle.dumps(_Calls(os.system, f"touch {marker}"), protocol=5)
    refused = _refused(data)
    assert refused.type_name in ("posix.system", "os.system") and not refused.allowable
    assert "only trusted_results=True" in str(refused) and "allowed_result_types" not in str(
        refused
    )
    # inside a container too, and as the exception of a raising task
    error = ValueError("x")
    error.payload = _Calls(os.system, f"touch {marker}")
    _refused(pickle.dumps({"ok": [1, error]}, protocol=5))


@pytest.mark.parametrize(
    "stream",
    [
        b"cposix\nsystem\n(S'touch {m}'\ntR.",  # protocol 0
        b"cos\nsystem\n(S'touch {m}'\ntR.",
        b"cbuiltins\ngetattr\n(cbuiltins\nValueError\nS'mro'\ntR.",
        b"csubprocess\nPopen\n((S'touch'\nS'{m}'\nltR.",
        b"cbuiltins\n__import__\n(S'os'\ntR.",
        b"ccopyreg\n_reconstructor\n(cos\n_wrap_close\ncbuiltins\nobject\nNtR.",
        b"ccopyreg\n_reconstructor\n(csubprocess\nPopen\ncbuiltins\nobject\nNtR.",
        b"c_codecs\nencode\n(S'x'\nS'latin1'\ntR.",
        b"\x80\x05\x8c\x08builtins\x8c\x1aValueError.__init__.__call__\x93.",
        b"csandboxrun._errors\nSandboxrunError.__subclasses__\n)R.",
        b"cbuiltins\nobject\n)R.",
        b"cbuiltins\ntype\n(S'x'\n)}tR.",
    ],
)
def test_dangerous_globals_are_refused(stream, marker):
    with pytest.raises(ResultDecodeError):
        loads(stream.replace(b"{m}", str(marker).encode()))


@pytest.mark.parametrize("func", [eval, exec, getattr, __import__, subprocess.Popen, os.popen])
def test_callables_are_refused_under_protocol_5(func, marker):
    argument = ["touch", str(marker)] if func is subprocess.Popen else f"touch {marker}"
    if func in (eval, exec):
        argument = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ResultTypeRefused):
        loads(pickle.dumps(_Calls(func, argument), protocol=5))


def test_copyreg_reconstructor_is_refused_even_for_an_allowed_class():
    old = pickle.dumps(MyResult("a"), protocol=1, fix_imports=False)
    assert b"_reconstructor" in old
    assert _refused(old, allowed=[MyResult]).type_name == "copyreg._reconstructor"


def test_a_stream_never_imports(tmp_path, monkeypatch, marker):
    # an importable module whose import would leave a mark
    (tmp_path / "sandboxrun_probe_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass ProbeError(Exception): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("sandboxrun_probe_module") is not None
    refused = _refused(b"csandboxrun_probe_module\nProbeError\n)R.")
    assert refused.type_name == "sandboxrun_probe_module.ProbeError"
    assert "not imported" in str(refused) and refused.allowable
    assert "sandboxrun_probe_module" not in sys.modules  # and the marker fixture: no file
    if "tabnanny" not in sys.modules:  # a stdlib module with an Exception subclass
        _refused(b"ctabnanny\nNannyNag\n(I1\nS'x'\nS'y'\ntR.")
        assert "tabnanny" not in sys.modules


def test_module_getattr_and_lazy_modules_are_not_triggered():
    calls = []
    module = types.ModuleType("sandboxrun_test_lazy_attr")
    module.__getattr__ = lambda attr: calls.append(attr) or ValueError  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    spec = importlib.util.find_spec("tabnanny")
    if spec is None or "tabnanny" in sys.modules:
        pytest.skip("tabnanny unavailable or imported")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    lazy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lazy)
    sys.modules["tabnanny"] = lazy
    try:
        _refused(b"csandboxrun_test_lazy_attr\nAnyError\n)R.")
        assert calls == []
        _refused(b"ctabnanny\nNannyNag\n(I1\nS'x'\nS'y'\ntR.")
        assert type(lazy).__name__ == "_LazyModule"  # still not loaded
    finally:
        del sys.modules[module.__name__], sys.modules["tabnanny"]


def test_persistent_ids_and_out_of_band_buffers_are_refused():
    with pytest.raises(ResultTypeRefused):
        loads(b"\x80\x05\x8c\x01xQ.")  # BINPERSID
    with pytest.raises(ResultTypeRefused):
        loads(b"Pabc\n.")  # PERSID
    with pytest.raises(ResultDecodeError):
        loads(b"\x80\x05\x97.")  # NEXT_BUFFER
    with pytest.raises(ResultDecodeError):
        kept: list[object] = []
        loads(pickle.dumps(pickle.PickleBuffer(b"x" * 10), protocol=5, buffer_callback=kept.append))


def test_extension_codes_cannot_bypass_find_class():
    code = 0x7FFFF0
    copyreg.add_extension("os", "getcwd", code)
    try:
        ext = b"\x80\x05\x84" + struct.pack("<i", code)
        assert pickle.loads(ext + b".") is os.getcwd  # now in copyreg._extension_cache
        with pytest.raises(ResultTypeRefused):
            loads(ext + b")R.")
    finally:
        copyreg.remove_extension("os", "getcwd", code)


def test_build_on_an_allowed_class_cannot_patch_it(caplog):
    original = MyResult.__eq__
    stream = (
        b"\x80\x05c" + __name__.encode() + b"\nMyResult\n"
        b"N}\x8c\x06__eq__c" + __name__.encode() + b"\nMyResult\ns\x86b."
    )
    with pytest.raises(ResultDecodeError, match="change the class"):
        loads(stream, allowed=[MyResult])
    assert MyResult.__eq__ is original and "__eq__" in vars(MyResult)
    assert any("changed the class" in r.getMessage() for r in caplog.records)
    added = stream.replace(b"\x8c\x06__eq__", b"\x8c\x06__ne2_")
    with pytest.raises(ResultDecodeError, match="change the class"):
        loads(added, allowed=[MyResult])
    assert not hasattr(MyResult, "__ne2_")
    on_exception = stream.replace(
        b"c" + __name__.encode() + b"\nMyResult\nN", b"cbuiltins\nValueError\nN", 1
    )
    with pytest.raises(ResultDecodeError):  # an exception class: BaseException.__setstate__
        loads(on_exception)
    assert MyResult(1) == MyResult(1)


# ---------------------------------------------------------------- what must not crash


def test_deep_nesting_loads_without_crashing_the_manager():
    depth = 200_000
    data = b"\x80\x05" + b"]" * depth + b"a" * (depth - 1) + b"."
    value = loads(data)
    seen = 0
    while value:
        (value,) = value
        seen += 1
    assert seen == depth - 1


@pytest.mark.parametrize(
    "stream",
    [
        b"",
        b"\x80",
        b"\x80\x05",
        b"garbage",
        b"\x80\x05N",
        b"\x80\x05(((((",
        b"\x80\x05a.",
        b"\x80\x05\x8e" + (2**62).to_bytes(8, "little") + b"x.",
        b"\x80\x05\x8e" + (8 << 30).to_bytes(8, "little") + b"x.",
        b"\x80\x05\x8a\xff" + b"\x01" * 10,
        b"\x80\x05\x95" + (2**63).to_bytes(8, "little"),
        b"F1e9999x\n.",
        b"\x80\x05\x8c\x08builtins\x8c\nValueError\x93\x8c\x01xR.",
        b"\x80\x05\x8c\x08builtins\x8c\x03set\x93]\x85b.",
    ],
)
def test_garbage_and_truncated_streams_are_one_error(stream):
    with pytest.raises(ResultDecodeError):
        loads(stream)


def test_every_truncation_of_a_real_result_is_a_decode_error():
    error = OSError(2, "x", "f")
    error.__notes__ = ["n"]
    data = pickle.dumps([MyResult("a"), error, {1: (2, 3j)}, b"z" * 300], protocol=5)
    for cut in range(len(data)):
        with pytest.raises(ResultDecodeError):
            loads(data[:cut], allowed=[MyResult])


def test_random_and_mutated_streams_raise_nothing_but_decode_errors(marker):
    seed = pickle.dumps([MyResult("a"), ValueError("v"), {1: {2}, "k": 1j}, b"x" * 50], protocol=5)
    for data in variants(seed, 3000, seed=1234):
        with contextlib.suppress(ResultDecodeError):
            loads(data, allowed=[MyResult])
    assert MyResult("a") == MyResult("a")


class Interrupting(Exception):
    def __init__(self, *args: object) -> None:
        raise KeyboardInterrupt


def test_keyboard_interrupt_is_not_swallowed():
    with pytest.raises(KeyboardInterrupt):
        loads(b"\x80\x05c" + __name__.encode() + b"\nInterrupting\n)R.", allowed=[Interrupting])


# ---------------------------------------------------------------- default types beyond builtins


def _dumps(value: object) -> bytes:
    return pickle.dumps(value, protocol=5)


def _global(module: str, name: str) -> bytes:
    """SHORT_BINUNICODE module, name, STACK_GLOBAL (protocol 4+)."""
    out = b""
    for text in (module, name):
        raw = text.encode()
        out += b"\x8c" + bytes([len(raw)]) + raw
    return out + b"\x93"


def _text(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(number: int) -> bytes:
    raw = number.to_bytes((number.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8b" + struct.pack("<I", len(raw)) + raw  # LONG4


@pytest.mark.parametrize("name", sorted(result_values.VALUES))
def test_default_types_round_trip_in_process(name):
    value = result_values.VALUES[name]()
    data = _dumps(value)
    got = loads(data)
    assert type(got) is type(value) and got == value
    if isinstance(value, collections.defaultdict):
        assert got.default_factory is value.default_factory
    if isinstance(value, collections.deque):
        assert got.maxlen == value.maxlen
    if isinstance(value, enum.Enum):
        assert got is value


def test_default_types_round_trip_through_a_real_manager():
    names = sorted(result_values.VALUES)
    with ProcessManager(2) as manager:
        for name in names:
            manager.queue_task(Task(result_values.make, (name,)))
    results = {r.task.args[0]: r for r in manager.task_results}
    for name in names:
        result, value = results[name], result_values.VALUES[name]()
        assert result.success, (name, result.exception)
        assert type(result.result) is type(value) and result.result == value, name


@pytest.mark.parametrize("name", ["FakeTuple", "HookedPoint", "Lenient"])
def test_look_alikes_are_refused_through_a_real_manager(name):
    result_values.CALLS.clear()
    with ProcessManager(1) as manager:
        manager.queue_task(Task(result_values.make_hostile, (name,)))
    (result,) = manager.task_results
    assert not result.success
    refused = result.exception
    assert isinstance(refused, ResultTypeRefused), result.exception
    assert refused.type_name.startswith("tests.result_values.") and refused.allowable
    assert result_values.CALLS == []  # none of the look-alike's code ran in the manager


def test_look_alikes_pass_once_allowed_by_name():
    data = _dumps(result_values.FakeTuple(1))
    result_values.CALLS.clear()
    assert type(loads(data, allowed=[result_values.FakeTuple])) is result_values.FakeTuple
    assert result_values.CALLS == ["FakeTuple.__new__"]  # now trusted: its code runs
    assert loads(_dumps(result_values.Lenient.A), allowed=[result_values.Lenient]) is (
        result_values.Lenient.A
    )


def test_zoneinfo_datetime_is_refused_without_reading_a_tz_file():
    stream = (
        b"\x80\x05" + _global("builtins", "getattr") + _global("zoneinfo", "ZoneInfo")
        + _text("_unpickle") + b"\x86R" + _text("../../etc/passwd") + b"\x88\x86R."
    )  # fmt: skip
    assert _refused(stream).type_name == "zoneinfo.ZoneInfo"


# ------------------------------------------------ hostile streams naming the default types


def test_defaultdict_factory_must_be_none_or_an_accepted_class(marker):
    dd = _global("collections", "defaultdict")
    assert _refused(b"\x80\x05" + dd + _global("posix", "system") + b"\x85R.").type_name in (
        "posix.system"
    )
    _refused(_dumps(collections.defaultdict(os.system)))
    factories = [
        ("builtins", "ValueError"),
        ("tests.result_values", "Point"),
        ("tests.result_values", "Color"),
        ("builtins", "BaseExceptionGroup"),
    ]
    for factory in factories:
        refused = _refused(b"\x80\x05" + dd + _global(*factory) + b"\x85R.")
        assert refused.type_name == "collections.defaultdict" and "default_factory" in str(refused)
    # an enum member, a namedtuple, a path: instances, not classes
    member = _global("tests.result_values", "Level") + b"K\x01\x85R"
    _refused(b"\x80\x05" + dd + member + b"\x85R.")
    # items as an argument (the constructor would copy them) instead of SETITEMS
    _refused(b"\x80\x05" + dd + b"N}\x86R.")


@pytest.mark.parametrize(
    "stream",
    [
        # the bombs a copying constructor would build from a few bytes
        _global("builtins", "bytearray") + _int(10**11) + b"\x85R.",
        _global("builtins", "set") + _global("builtins", "range") + _int(10**12) + b"\x85R\x85R.",
        _global("builtins", "list") + _global("builtins", "range") + _int(10**9) + b"\x85R\x85R.",
        _global("builtins", "bytes") + _int(10**11) + b"\x85R.",
        _global("collections", "deque")
        + _global("builtins", "range")
        + _int(10**18)
        + b"\x85RK\x00\x86R.",
        _global("collections", "Counter")
        + _global("builtins", "range")
        + _int(10**9)
        + b"\x85R\x85R.",
        _global("collections", "OrderedDict") + b"]\x85R.",
        # the functional enum API would make a new class
        _global("tests.result_values", "Color") + _text("New") + _text("A B") + b"\x86R.",
        # Flag values outside the members' bits (Flag._missing_ would cache each one)
        _global("tests.result_values", "Perm") + _int(1 << 40) + b"\x85R.",
        _global("re", "RegexFlag") + _int(-1) + b"\x85R.",
        # Decimal: one str only (no context, no int to convert, no tuple)
        _global("decimal", "Decimal") + _text("1") + _global("decimal", "Context") + b")R\x86R.",
        _global("decimal", "Decimal") + _text("1") + b"N\x86R.",
        _global("decimal", "Decimal") + _int(10**5000) + b"\x85R.",
        # Fraction("1e999999999") would compute 10**999999999
        _global("fractions", "Fraction") + _text("1e999999999") + b"\x85R.",
        _global("fractions", "Fraction") + b"K\x01K\x00\x86R.",
        # a path from a non-str part
        _global("pathlib", "PosixPath") + b"K\x01\x85R.",
        # an exception group over a lazily huge range
        _global("builtins", "ExceptionGroup")
        + _text("g")
        + _global("builtins", "range")
        + _int(10**10)
        + b"\x85R\x86R.",
    ],
)
def test_checked_constructors_refuse_what_reduce_never_gives(stream):
    with pytest.raises(ResultDecodeError):
        loads(b"\x80\x05" + stream)


def test_memoized_arguments_cannot_multiply_a_copy():
    # one 64 KiB string memoized, then handed to a path constructor 10 000 times as parts
    part = _text("p" * (1 << 16)) + b"\x940"  # memoized, then popped
    stream = b"\x80\x05" + _global("pathlib", "PurePosixPath") + part + b"(" + b"h\x00" * 10_000
    with pytest.raises(ResultDecodeError, match="expand"):
        loads(stream + b"tR.")
    # a 40 000-item dict given to Counter 1 000 times
    items = b"}\x94(" + b"".join(b"J" + struct.pack("<i", i) + b"K\x01" for i in range(40_000))
    counter = _global("collections", "Counter") + b"\x94"
    calls = b"(" + b"h\x01h\x00\x85R" * 1000 + b"l."
    with pytest.raises(ResultDecodeError, match="expand"):
        loads(b"\x80\x05" + items + b"u" + counter + calls)


def test_a_class_object_as_a_value_is_refused_not_replaced():
    for module, name in [("builtins", "list"), ("decimal", "Decimal"),
                         ("tests.result_values", "Color")]:  # fmt: skip
        refused = _refused(b"\x80\x05" + _global(module, name) + b"\x85.")
        assert refused.type_name == f"{module}.{name}" and "class object" in refused.reason
    # a default_factory is the class itself
    got = loads(_dumps(collections.defaultdict(list)))
    assert got.default_factory is list


def test_build_cannot_change_an_enum_member_or_a_stand_in(caplog):
    member = _global("tests.result_values", "Color") + _text("red") + b"\x85R"
    stream = b"\x80\x05" + member + b"}" + _text("_value_") + _text("blue") + b"sb."
    with pytest.raises(ResultDecodeError, match="enum member"):
        loads(stream)
    assert result_values.Color.RED.value == "red"
    assert result_values.Color("red") is result_values.Color.RED
    # slot state on a stand-in would redirect it to another class
    stand_in = _global("decimal", "Decimal")
    slots = b"N}" + _text("cls") + _global("builtins", "list") + b"s\x86b"
    with pytest.raises(ResultTypeRefused):
        loads(b"\x80\x05" + stand_in + slots + b".")


def test_build_cannot_patch_a_namedtuple_class_or_uuid():
    for module, name, cls in [("tests.result_values", "Point", result_values.Point),
                              ("uuid", "UUID", uuid.UUID)]:  # fmt: skip
        original = vars(cls)["__repr__"]
        stream = (
            b"\x80\x05" + _global(module, name) + b"\x94N}" + _text("__repr__")
            + b"h\x00s\x86b."
        )  # fmt: skip
        with pytest.raises(ResultDecodeError) as info:
            loads(stream)
        assert vars(cls)["__repr__"] is original
        # a namedtuple class takes slot state with setattr (undone); UUID's __setstate__ is
        # called unbound and fails
        assert ("change the class" in str(info.value)) == (cls is result_values.Point)


def test_a_path_reaches_no_file_system_method(tmp_path):
    # UUID(hex) calls hex.replace(...): a Path's replace() renames a file, but takes one
    # argument where str.replace takes two, so the call fails before any I/O.
    victim = tmp_path / "victim"
    victim.write_text("x")
    path = _global("pathlib", "PosixPath") + _text(str(victim)) + b"\x85R"
    with pytest.raises(ResultDecodeError):
        loads(b"\x80\x05" + _global("uuid", "UUID") + path + b"\x85R.")
    assert victim.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["victim"]


def test_a_namedtuple_look_alike_of_a_module_not_imported_is_not_imported(tmp_path, monkeypatch):
    (tmp_path / "sandboxrun_probe_tuple.py").write_text(
        "import collections\nCALLS = []\nP = collections.namedtuple('P', 'a')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = _refused(b"\x80\x05" + _global("sandboxrun_probe_tuple", "P") + b"K\x01\x85\x81.")
    assert "not imported" in str(refused) and "sandboxrun_probe_tuple" not in sys.modules


def test_mp_main_names_the_managers_main_only_for_what_main_defines(monkeypatch):
    main = types.ModuleType("__main__")
    main.Path = pathlib.Path  # imported into the script: not a class of the script
    main.system = os.system
    main.Report = MyResult
    main.Point = result_values.Point
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.delitem(sys.modules, "__mp_main__", raising=False)
    for name in ("Path", "system", "Point"):
        refused = _refused(b"\x80\x05" + _global("__mp_main__", name) + b"\x85.")
        assert refused.type_name == f"__mp_main__.{name}"
    path_call = _global("__mp_main__", "Path") + _text("/x") + b"\x85R."
    _refused(b"\x80\x05" + path_call)
    report = _global("__mp_main__", "Report") + b")\x81}" + _text("name") + _text("r") + b"sb."
    _refused(b"\x80\x05" + report, allowed=[MyResult])  # MyResult is this module's, not main's


MAIN_SCRIPT = textwrap.dedent(
    """
    import collections, dataclasses, enum, json, sys
    from sandboxrun import ProcessManager, Task

    @dataclasses.dataclass
    class Report:
        pages: int

    @dataclasses.dataclass
    class Unlisted:
        pages: int

    Pair = collections.namedtuple("Pair", "a b")

    class Mode(enum.Enum):
        FAST = 1

    def report():
        return [Report(3), Pair(1, 2), Mode.FAST]

    def unlisted():
        return Unlisted(1)

    if __name__ == "__main__":
        method = sys.argv[1]
        options = {} if method == "zygote" else {"isolation": "none"}
        with ProcessManager(1, start_method=method, allowed_result_types=[Report], **options) as pm:
            pm.queue_task(Task(report))
            pm.queue_task(Task(unlisted))
        out = {}
        for result in pm.task_results:
            name = result.task.func.__name__
            if result.success:
                value = result.result
                out[name] = [value[0] == Report(3), type(value[0]) is Report,
                             value[1] == (1, 2), type(value[1]) is Pair, value[2] is Mode.FAST]
            else:
                out[name] = [type(result.exception).__name__,
                             getattr(result.exception, "type_name", None)]
        print(json.dumps(out))
    """
)


@pytest.mark.parametrize("start_method", ["zygote", "spawn", "forkserver", "fork"])
def test_allowed_classes_of_the_main_script_pass_on_every_start_method(tmp_path, start_method):
    from sandboxrun._launch import ZYGOTE_AVAILABLE

    if start_method == "zygote" and not ZYGOTE_AVAILABLE:
        pytest.skip("no zygote here")
    if start_method == "zygote" and sys.platform != "linux":
        pytest.skip("the zygote is Linux only")
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["report"] == [True, True, True, True, True]
    main_name = "__main__" if start_method == "fork" else "__mp_main__"
    assert out["unlisted"] == ["ResultTypeRefused", f"{main_name}.Unlisted"]


def _by_name_stream(value: object) -> bytes:
    """``value`` pickled the way some CPython 3.11 releases pickle enum members (3.11.2, the
    guest's): ``getattr(cls, name)``, a flag combination as ``operator.or_(a, b)``."""
    import operator

    class ByName(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if isinstance(obj, enum.Flag) and (obj.name is None or "|" in obj.name):
                parts = [m for m in type(obj) if m in obj]
                return operator.or_, (parts[0], type(obj)(obj.value & ~parts[0].value))
            if isinstance(obj, enum.Enum):
                return getattr, (type(obj), obj.name)
            return NotImplemented

    buffer = io.BytesIO()
    ByName(buffer, protocol=5).dump(value)
    return buffer.getvalue()


def test_enum_members_pickled_by_name_arrive() -> None:
    from .result_values import Color, Level, Perm

    rules = ResultTypes()
    for value in (Color.RED, Level.HIGH, Perm.R, Perm.R | Perm.W, [Color.GREEN, Perm.X]):
        stream = _by_name_stream(value)
        assert b"getattr" in stream
        assert rules.loads(stream) == value


def test_getattr_and_or_reach_nothing_but_enum_members() -> None:
    """The names some releases pickle members with are stand-ins: never the real callables."""
    import operator

    from .result_values import Perm

    rules = ResultTypes()
    hostile = [
        (getattr, (pathlib.PosixPath, "cwd")),  # an accepted class, but no enum: Path.cwd
        (getattr, (Perm, "_missing_")),  # not a member name
        (operator.or_, (1, 2)),  # not flag members
    ]
    for function, args in hostile:

        class Forge:
            def __reduce__(self, f: object = function, a: object = args) -> object:
                return f, a

        with pytest.raises(ResultDecodeError):
            rules.loads(pickle.dumps(Forge(), protocol=5))
