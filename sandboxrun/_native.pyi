# sandboxrun/_native.c (optional: absent where it was not built)
from collections.abc import Sequence

def fork_reaper(
    close_fds: Sequence[int],
    enter_files: Sequence[str],
    control_fd: int,
    wait_for_go: bool,
    status_w: int,
    zygote_pidfd: int,
    helper_pidfd: int = -1,
) -> tuple[int, int, int]: ...

def watch(sock_fd: int, pid: int, flags: int, status_r: int, /) -> int: ...

# The raw syscalls (sandboxrun/_syscalls.py): 0, or the errno.
def unshare(flags: int, /) -> int: ...
def setns(fd: int, nstype: int, /) -> int: ...
def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int,
    data: str | bytes | None,
    /,
) -> int: ...
def mount_setattr(path: str | bytes, attr_set: int, attr_clr: int, flags: int, /) -> int: ...
def prctl(option: int, arg2: int = 0, arg3: int = 0, /) -> int: ...
def capset_empty() -> int: ...
def seccomp_load(program: bytes, flags: int, /) -> int: ...
