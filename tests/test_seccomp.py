"""sandboxrun/_isolation/_seccomp.py: the denylist filter refuses what it lists, with the errno it
lists, and honest work still runs under it. Each load happens in a forked child (a filter can
never be removed), which reports through a pipe and ``os._exit``s. Both loaders, the compiled
one (sandboxrun._native) and its ctypes twin, are tested side by side as in test_syscalls.py."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from .conftest import syscall_implementations

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux seccomp")

if sys.platform.startswith("linux"):
    import ctypes

    from sandboxrun._isolation import _seccomp

    _LIBC = ctypes.CDLL(None, use_errno=True)

MACHINE = os.uname().machine
X86_64_HEADER = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"
GENERIC_HEADER = "/usr/include/asm-generic/unistd.h"  # aarch64's numbering
SIGCHLD = 17
TIOCGWINSZ = 0x5413
HIGH_WORD = 0xFFFFFFFF00000000


def _nr(name: str) -> int:
    return _seccomp._numbers(0 if MACHINE == "x86_64" else 1)[name]


def _raw(nr: int, *args: int) -> int:
    """syscall(nr, args...) through libc: 0 (a returned fd closed), or the errno."""
    values = [ctypes.c_long(arg if arg < 2**63 else arg - 2**64) for arg in args]
    result = _LIBC.syscall(ctypes.c_long(nr), *values)
    if result < 0:
        return ctypes.get_errno()
    if result == 0 and nr == _nr("clone"):  # a clone that was let through: this is its child
        os._exit(0)
    if nr in (_nr("socket"), _nr("io_uring_setup")):
        os.close(result)
    return 0


def _in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``body()`` in a forked child; its dict back (or the error), and how the child ended."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        # Forked with os.fork from pytest's process: multiprocessing still lists the processes
        # earlier tests started from it as children, and its forkserver (a Pool made here would
        # waitpid them: ECHILD). What a fresh process would have: none of them.
        import multiprocessing.forkserver
        import multiprocessing.process

        multiprocessing.process._children.clear()  # type: ignore[attr-defined]
        server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            out = body()
        except BaseException as error:  # reported, not raised in a forked pytest
            import traceback

            out = {"error": repr(error), "where": traceback.format_exc()[-3000:]}
        os.write(write_fd, json.dumps(out).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child ended by signal {os.WTERMSIG(status)}"
    return dict(json.loads(data))


def _load_with(impl: ModuleType) -> None:
    assert impl.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1) == 0
    error = impl.seccomp_load(_seccomp.program(), _seccomp.SECCOMP_FILTER_FLAG_TSYNC)
    assert error == 0, os.strerror(error)


def _unconditional() -> dict[str, int]:
    return {name: errno.EPERM if text == "EPERM" else errno.ENOSYS
            for name, text in _seccomp.DENIED.items() if text in ("EPERM", "ENOSYS")}  # fmt: skip


def _refusals(impl: ModuleType) -> dict[str, Any]:
    os.setsid()  # no controlling terminal: vhangup below could hang up nothing, even unfiltered
    out: dict[str, Any] = {}
    # Unfiltered, these answer otherwise (EINVAL, EFAULT, EIO, ...): the control.
    control = ("keyctl", "clone3", "io_uring_setup", "perf_event_open", "bpf", "ptrace")
    out["before"] = {name: _raw(_nr(name), *[2**64 - 1] * 6) for name in control}
    _load_with(impl)
    # Every argument -1: refused before the kernel reads them (and harmless if it did).
    out["each"] = {name: _raw(_nr(name), *[2**64 - 1] * 6) for name in _unconditional()}
    out["unshare(NEWUSER)"] = impl.unshare(_seccomp.CLONE_NEWUSER)
    out["clone(NEWUSER)"] = _raw(_nr("clone"), _seccomp.CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    out["clone(NEWNS|NEWPID), high word set"] = _raw(
        _nr("clone"), HIGH_WORD | _seccomp.CLONE_NEWNS | _seccomp.CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0
    )
    out["clone(NEWNET)"] = _raw(_nr("clone"), _seccomp.CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0)
    _master, slave = os.openpty()
    char = ctypes.c_char(b"x")
    for name, request in [
        ("TIOCSTI", _seccomp.TIOCSTI),
        ("TIOCSTI, high word set", HIGH_WORD | _seccomp.TIOCSTI),
        ("TIOCLINUX, high word set", HIGH_WORD | _seccomp.TIOCLINUX),
    ]:
        out[name] = _raw(_nr("ioctl"), slave, request, ctypes.addressof(char))
    size = ctypes.create_string_buffer(8)
    out["TIOCGWINSZ"] = _raw(_nr("ioctl"), slave, TIOCGWINSZ, ctypes.addressof(size))
    out["socket(AF_ALG)"] = _raw(_nr("socket"), _seccomp.AF_ALG, 5, 0)  # SOCK_SEQPACKET
    out["socket(AF_ALG), high word set"] = _raw(_nr("socket"), HIGH_WORD | _seccomp.AF_ALG, 5, 0)
    out["socket(AF_VSOCK)"] = _raw(_nr("socket"), _seccomp.AF_VSOCK, 1, 0)
    pair = (ctypes.c_int * 2)()
    out["socketpair(AF_VSOCK)"] = _raw(_nr("socketpair"), _seccomp.AF_VSOCK, 1, 0,
                                       ctypes.addressof(pair))  # fmt: skip
    out["socket(AF_INET)"] = _raw(_nr("socket"), 2, 1, 0)
    out["getpid"] = os.getpid() > 0
    return out


@pytest.mark.parametrize("impl", syscall_implementations())
def test_each_denied_call_gets_its_errno(impl: ModuleType) -> None:
    out = _in_child(lambda: _refusals(impl))
    assert "error" not in out, out["error"]
    assert out.pop("each") == _unconditional()
    before = out.pop("before")
    assert all(result not in (errno.EPERM, errno.ENOSYS, 0) for result in before.values()), before
    assert out == {
        "unshare(NEWUSER)": errno.EPERM,
        "clone(NEWUSER)": errno.EPERM,
        "clone(NEWNS|NEWPID), high word set": errno.EPERM,
        "clone(NEWNET)": errno.EPERM,
        "TIOCSTI": errno.EPERM,
        "TIOCSTI, high word set": errno.EPERM,
        "TIOCLINUX, high word set": errno.EPERM,
        "TIOCGWINSZ": 0,
        "socket(AF_ALG)": errno.EAFNOSUPPORT,
        "socket(AF_ALG), high word set": errno.EAFNOSUPPORT,
        "socket(AF_VSOCK)": errno.EAFNOSUPPORT,
        "socketpair(AF_VSOCK)": errno.EAFNOSUPPORT,
        "socket(AF_INET)": 0,
        "getpid": True,
    }


def _honest_work() -> dict[str, Any]:
    import asyncio
    import multiprocessing
    import sqlite3
    import ssl
    import subprocess
    import threading

    _seccomp.load(_seccomp.program())
    out: dict[str, Any] = {}
    out["subprocess"] = subprocess.run(["/bin/true"]).returncode
    box: list[int] = []
    thread = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    thread.start()
    thread.join()
    out["thread"] = len(box)
    for method in ("fork", "spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            out[f"pool {method}"] = pool.map(abs, [-1, -2])
    with sqlite3.connect(":memory:") as db:
        out["sqlite3"] = db.execute("select 6 * 7").fetchone()[0]
    out["ssl"] = ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    out["asyncio"] = asyncio.run(answer())
    pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ))
    out["posix_spawn"] = os.waitpid(pid, 0)[1]
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if os.path.exists("/usr/bin/unshare"):  # the filter is kept across execve
        done = subprocess.run(["/usr/bin/unshare", "-U", "true"], capture_output=True)
        out["unshare -U"] = done.returncode
    return out


def test_honest_work_runs_under_the_filter() -> None:
    out = _in_child(_honest_work)
    assert "error" not in out, out["error"]
    unshare = out.pop("unshare -U", 1)
    assert unshare != 0
    assert out == {
        "subprocess": 0,
        "thread": 1,
        "pool fork": [1, 2],
        "pool spawn": [1, 2],
        "pool forkserver": [1, 2],
        "sqlite3": 42,
        "ssl": True,
        "asyncio": 42,
        "posix_spawn": 0,
        "fork": 7,
    }


def _logged_and_x32() -> dict[str, Any]:
    _seccomp.load(_seccomp.program(log=True), log=True)
    out: dict[str, Any] = {"keyctl": _raw(_nr("keyctl"), 0, 0, 0, 0, 0)}
    if MACHINE == "x86_64":  # an x32 call shares the arch and carries bit 30: killed
        pid = os.fork()
        if pid == 0:
            _raw(39 | _seccomp.X32_SYSCALL_BIT)  # x32 getpid
            os._exit(0)
        status = os.waitpid(pid, 0)[1]
        out["x32"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited"
    return out


def test_log_flag_loads_and_foreign_abi_is_killed() -> None:
    out = _in_child(_logged_and_x32)
    assert out.pop("keyctl") == errno.EPERM, out
    assert out == ({"x32": signal.SIGSYS} if MACHINE == "x86_64" else {})


def _bad_programs(impl: ModuleType) -> dict[str, Any]:
    assert impl.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1) == 0
    out: dict[str, Any] = {
        "empty": impl.seccomp_load(b"", 0),
        "not whole instructions": impl.seccomp_load(b"\0" * 12, 0),
        "bad opcode": impl.seccomp_load(b"\xff\xff\0\0\0\0\0\0", 0),
    }
    try:
        _seccomp.load(b"\xff\xff\0\0\0\0\0\0")
    except OSError as error:
        out["load raises"] = [error.errno, str(error)]
    return out


@pytest.mark.parametrize("impl", syscall_implementations())
def test_a_bad_program_is_an_errno(impl: ModuleType) -> None:
    out = _in_child(lambda: _bad_programs(impl))
    assert "error" not in out, out["error"]
    raised = out.pop("load raises")
    assert raised[0] == errno.EINVAL
    assert "seccomp(SET_MODE_FILTER, 0x1, 1 instructions)" in raised[1]
    assert out == dict.fromkeys(["empty", "not whole instructions", "bad opcode"], errno.EINVAL)


def test_probe_says_it_works() -> None:
    assert _seccomp.probe() is True


def test_program_is_built_once_and_well_formed() -> None:
    prog = _seccomp.program()
    assert prog is _seccomp.program()
    assert len(prog) % 8 == 0 and 0 < len(prog) // 8 <= _seccomp.BPF_MAXINSNS
    import struct

    first = struct.unpack("=HBBI", prog[:8])
    assert first == (0x20, 0, 0, 4)  # ld [arch]
    last = struct.unpack("=HBBI", prog[-8:])
    assert last == (0x06, 0, 0, _seccomp.SECCOMP_RET_KILL_PROCESS)


def test_denied_lists_the_named_calls() -> None:
    denied = _seccomp.DENIED
    for name in ("add_key", "keyctl", "ptrace", "bpf", "unshare", "mount", "reboot", "syslog"):
        assert denied[name] == "EPERM"
    assert denied["clone3"] == denied["io_uring_setup"] == "ENOSYS"
    assert "CLONE_NEW" in denied["clone"] and "TIOCSTI" in denied["ioctl"]
    assert ("iopl" in denied) == (MACHINE == "x86_64")
    assert "personality" not in denied and "vmsplice" not in denied
    assert set(_seccomp._EPERM) | set(_seccomp._ENOSYS) <= set(_seccomp._NUMBERS)


def _header_numbers(path: str) -> dict[str, int]:
    with open(path) as header:
        found = re.findall(r"^#define __NR_(\w+)\s+(\d+)\s*$", header.read(), re.MULTILINE)
    return {name: int(number) for name, number in found}


@pytest.mark.parametrize(("column", "path"), [(0, X86_64_HEADER), (1, GENERIC_HEADER)],
                         ids=["x86_64", "aarch64"])  # fmt: skip
def test_numbers_match_the_kernel_headers(column: int, path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed (linux-libc-dev)")
    header = _header_numbers(path)
    ours = _seccomp._numbers(column)
    # Calls newer than the installed headers (Debian 12's are 6.1's): checked where they are.
    newer = {"fchmodat2"} - set(header)  # Linux 6.6
    assert {name: header.get(name) for name in ours if name not in newer} == {
        name: number for name, number in ours.items() if name not in newer
    }
    missing = {name for name, pair in _seccomp._NUMBERS.items() if pair[column] is None}
    assert not missing & set(header)  # absent here, absent there (iopl, ioperm, ... on aarch64)


def _run_bpf(prog: bytes, nr: int, arch: int, args: tuple[int, ...] = (0,) * 6) -> int:
    """A classic-BPF interpreter for what the assembler emits, over a seccomp_data."""
    import struct

    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    code = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif op in (0x15, 0x35, 0x45):  # jeq, jge, jset
            hit = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += 1 + (jt if hit else jf)
        else:
            assert op == 0x06, hex(op)
            return int(k)


@pytest.mark.parametrize("column", [0, 1], ids=["x86_64", "aarch64"])
def test_program_answers_each_number_as_listed(column: int) -> None:
    """Every syscall number 0..1023 of either table, emulated: the listed action, else allow."""
    arch = (_seccomp.AUDIT_ARCH_X86_64, _seccomp.AUDIT_ARCH_AARCH64)[column]
    prog = _seccomp._build(column, arch)
    numbers = _seccomp._numbers(column)
    errno_of = {"EPERM": errno.EPERM, "ENOSYS": errno.ENOSYS}
    expected = {numbers[name]: _seccomp.SECCOMP_RET_ERRNO | errno_of[text]
                for name, text in _seccomp._denied(column).items() if text in errno_of}  # fmt: skip
    for nr in range(1024):
        want = expected.get(nr, _seccomp.SECCOMP_RET_ALLOW)
        assert _run_bpf(prog, nr, arch) == want, nr
    kill = _seccomp.SECCOMP_RET_KILL_PROCESS
    assert _run_bpf(prog, numbers["ioctl"], arch ^ 1) == kill
    if column == 0:
        assert _run_bpf(prog, 39 | _seccomp.X32_SYSCALL_BIT, arch) == kill
    eperm = _seccomp.SECCOMP_RET_ERRNO | errno.EPERM
    clone = numbers["clone"]
    assert _run_bpf(prog, clone, arch, (SIGCHLD | 0x01000000, 0, 0, 0, 0, 0)) != eperm
    assert _run_bpf(prog, clone, arch, (HIGH_WORD | _seccomp.CLONE_NEWUTS, 0, 0, 0, 0, 0)) == eperm
    assert (
        _run_bpf(prog, numbers["ioctl"], arch, (0, HIGH_WORD | _seccomp.TIOCSTI, 0, 0, 0, 0))
        == eperm
    )
    assert _run_bpf(prog, numbers["ioctl"], arch, (0, TIOCGWINSZ, 0, 0, 0, 0)) != eperm
    assert _run_bpf(prog, numbers["socketpair"], arch, (_seccomp.AF_ALG, 0, 0, 0, 0, 0)) == (
        _seccomp.SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT
    )
