"""sandboxrun/_syscalls.py: the compiled syscalls (sandboxrun._native) and their ctypes twin
give the same results -- 0 or the same errno -- for the same calls. The isolation tests run the
one selected at import (the compiled one where built); this runs both, side by side."""

from __future__ import annotations

import errno
import json
import os
import sys
from types import ModuleType
from typing import Any

import pytest

from .conftest import syscall_implementations

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux syscalls")

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 16384, 1 << 18
MOUNT_ATTR_RDONLY = 0x1
PR_SET_NO_NEW_PRIVS = 38


def _status(field: str) -> str:
    with open("/proc/self/status") as status:
        return next(line.split(":", 1)[1].strip() for line in status if line.startswith(field))


def _in_child(impl: ModuleType, folder: str) -> dict[str, Any]:
    """Every call, in a forked child (they change its namespaces, flags, capabilities)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        out: dict[str, Any] = {}
        try:
            out["setns bad fd"] = impl.setns(-1, CLONE_NEWNS)
            out["mount missing target"] = impl.mount("tmpfs", "/nonexistent/x", "tmpfs", 0, None)
            out["mount_setattr missing"] = impl.mount_setattr("/nonexistent/x", 1, 0, 0)
            out["prctl unknown"] = impl.prctl(99999)
            out["unshare"] = impl.unshare(CLONE_NEWNS)
            out["private"] = impl.mount(None, "/", None, MS_REC | MS_PRIVATE, None)
            out["tmpfs"] = impl.mount("tmpfs", folder, "tmpfs", 0, "size=64k,mode=700")
            out["on the tmpfs"] = os.statvfs(folder).f_blocks * os.statvfs(folder).f_frsize
            out["read-only"] = impl.mount_setattr(folder, MOUNT_ATTR_RDONLY, 0, 0)
            try:
                open(os.path.join(folder, "f"), "w").close()
                out["write"] = 0
            except OSError as error:
                out["write"] = error.errno
            out["no_new_privs"] = impl.prctl(PR_SET_NO_NEW_PRIVS, 1)
            out["NoNewPrivs"] = _status("NoNewPrivs")
            out["capset"] = impl.capset_empty()
            out["CapEff"] = _status("CapEff")
        except BaseException as error:  # reported, not raised in a forked pytest
            out["error"] = repr(error)
        os.write(write_fd, json.dumps(out).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts and capset need root")
@pytest.mark.parametrize("impl", syscall_implementations())
def test_each_syscall_gives_0_or_the_errno(impl: ModuleType, tmp_path: Any) -> None:
    out = _in_child(impl, str(tmp_path))
    assert out == {
        "setns bad fd": errno.EBADF,
        "mount missing target": errno.ENOENT,
        "mount_setattr missing": errno.ENOENT,
        "prctl unknown": errno.EINVAL,
        "unshare": 0,
        "private": 0,
        "tmpfs": 0,
        "on the tmpfs": 64 * 1024,
        "read-only": 0,
        "write": errno.EROFS,
        "no_new_privs": 0,
        "NoNewPrivs": "1",
        "capset": 0,
        "CapEff": "0000000000000000",
    }
    assert not os.listdir(tmp_path)  # the tmpfs was the child's own mount namespace's


def test_the_compiled_ones_are_chosen_where_built() -> None:
    from sandboxrun import _syscalls

    try:
        from sandboxrun import _native  # noqa: F401
    except ImportError:
        assert not _syscalls.NATIVE
    else:
        assert (os.environ.get("SANDBOXRUN_NATIVE") != "0") == _syscalls.NATIVE
