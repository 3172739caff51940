"""The restricted unpickler for result bodies: no stream can run code in, import into, change or
crash the manager; the value types, exceptions and allowed classes come through intact."""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import dataclasses
import importlib.util
import mmap
import os
import pickle
import struct
import subprocess
import sys
import types

import pytest

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


def test_allowing_a_builtin_class_such_as_ordered_dict():
    data = pickle.dumps(collections.OrderedDict(a=1), protocol=5)
    assert _refused(data).type_name == "collections.OrderedDict"
    assert loads(data, allowed=[collections.OrderedDict]) == {"a": 1}


def test_trusted_results_is_plain_pickle():
    import fractions

    data = pickle.dumps(fractions.Fraction(1, 3), protocol=5)
    assert _refused(data).type_name == "fractions.Fraction"
    assert loads(data, trusted=True) == fractions.Fraction(1, 3)


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


def test_copyreg_reconstructor_with_a_disallowed_class_is_refused():
    old = pickle.dumps(collections.OrderedDict(a=1), protocol=1)
    with pytest.raises(ResultTypeRefused):
        loads(old)


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
