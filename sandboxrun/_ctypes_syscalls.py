"""``_syscalls`` through ctypes, where ``sandboxrun._native`` is not built: the same functions,
each returning 0 or the errno."""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import ctypes
import errno
import os

_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_MOUNT_SETATTR = 442  # the same on every architecture (it postdates the unified numbering)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_AT_EMPTY_PATH, _AT_RECURSIVE = 0x1000, 0x8000
_MOUNT_ATTR_IDMAP = 0x00100000
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40


def _errno(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


def _raw(text: str | bytes | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int, /) -> int:
    return _errno(_LIBC.unshare(ctypes.c_int(flags)))


def setns(fd: int, nstype: int, /) -> int:
    return _errno(_LIBC.setns(ctypes.c_int(fd), ctypes.c_int(nstype)))


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int,
    data: str | bytes | None,
    /,
) -> int:
    flags_ = ctypes.c_ulong(flags)
    return _errno(_LIBC.mount(_raw(source), _raw(target), _raw(fstype), flags_, _raw(data)))


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(path: str | bytes, attr_set: int, attr_clr: int, flags: int, /) -> int:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    result = _LIBC.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(-100), os.fsencode(path),  # AT_FDCWD
        ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip
    return _errno(result)


def idmapped_tree(source_fd: int, userns_fd: int, recursive: bool, /) -> int:
    """``_native.idmapped_tree``: open_tree (428) a detached copy, mount_setattr (442) the
    idmap; the tree's fd, or minus the errno."""
    tree_flags = 1 | os.O_CLOEXEC | _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
    syscall = _LIBC.syscall
    tree = syscall(ctypes.c_long(428), ctypes.c_int(source_fd), b"", ctypes.c_uint(tree_flags))
    if tree < 0:
        return -ctypes.get_errno()
    attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    flags = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
    result = syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(tree), b"",
                     ctypes.c_uint(flags), ctypes.byref(attr),
                     ctypes.c_size_t(ctypes.sizeof(attr)))  # fmt: skip
    if result < 0:
        error = ctypes.get_errno()
        os.close(tree)
        return -error
    return int(tree)


def attach_tree(tree: int, target_fd: int, /) -> int:
    """``_native.attach_tree``: move_mount (429) a detached tree onto ``target_fd``."""
    flags = ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH)
    result = _LIBC.syscall(ctypes.c_long(429), ctypes.c_int(tree), b"",
                           ctypes.c_int(target_fd), b"", flags)  # fmt: skip
    return _errno(result)


def prctl(option: int, arg2: int = 0, arg3: int = 0, /) -> int:
    result = _LIBC.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                         ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
    return _errno(result)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset_empty() -> int:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # zero-filled: both 32-bit halves of each set
    return _errno(_LIBC.capset(ctypes.byref(header), data))


class _SockFprog(ctypes.Structure):  # linux/filter.h, struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# seccomp(2) has no glibc wrapper; its number differs per architecture (the raw syscall).
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "arm64": 277}.get(os.uname().machine)


def seccomp_load(program: bytes, flags: int, /) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, program): as _native.c's (a positive TSYNC
    result, the thread that could not be synchronised, is ESRCH)."""
    if _SYS_SECCOMP is None:
        return errno.ENOSYS
    if not program or len(program) % 8 or len(program) // 8 > 4096:  # BPF_MAXINSNS
        return errno.EINVAL
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    result = _LIBC.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(1),  # SET_MODE_FILTER
                           ctypes.c_uint(flags), ctypes.byref(fprog))  # fmt: skip
    return errno.ESRCH if result > 0 else _errno(result)
