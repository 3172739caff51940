"""A seccomp-BPF denylist for a task: the program built once (per slot, in the zygote), loaded
in each task's own process.

The program is classic BPF assembled here (no libseccomp: only its runtime is installed, not
its headers, and its bindings would bring ctypes into the zygote). It is a *denylist*: CPython
and the libraries a task loads use a wide, changing set of syscalls, so everything not named
below is allowed. What is refused, and how (``DENIED`` has it as text for the docs and doctor):

- a foreign architecture (a 32-bit ``int 0x80`` from an x86_64 process, x32 calls):
  SECCOMP_RET_KILL_PROCESS, since every number below means something else there;
- kernel attack surface no converter needs (keyrings, ``bpf``, ``perf_event_open``,
  ``userfaultfd``), other processes' memory (``ptrace`` and its relatives), namespaces and
  mounts, modules, kexec, swap, reboot, the kernel log: EPERM;
- ``clone3`` and ``io_uring_*``: ENOSYS, so that glibc falls back to ``clone``, whose flags the
  filter can read (``clone3`` passes them in memory), and because io_uring submissions would
  bypass a syscall filter altogether (Docker, flatpak, isolate all answer ENOSYS);
- ``clone`` with any ``CLONE_NEW*`` flag, ``ioctl(TIOCSTI/TIOCLINUX)``, ``socket(AF_ALG /
  AF_VSOCK)``: refused by their arguments.

Seeing what a task was refused: load with ``log=True`` (SECCOMP_FILTER_FLAG_LOG). Each refused
call is then written to the kernel log as an audit record of type 1326 naming it by number,
``... type=1326 ... syscall=NNN ...`` (``dmesg``, ``journalctl -k``, or the audit log), on
kernels whose ``/proc/sys/kernel/seccomp/actions_logged`` lists ``errno`` (the default). Map
NNN to a name with ``ausyscall NNN`` or the ``_NUMBERS`` table below. glibc tries ``clone3``
for every thread and ``posix_spawn`` before falling back, so those appear too, harmlessly.

Order in a task: the filter refuses ``mount``, ``unshare``, ``setns``..., so it is loaded after
the namespace, mount, cgroup and privilege steps, last before the task's code (nsjail:
``containProc`` -> ``applyPolicy`` -> ``execve``). ``load`` sets no_new_privs itself (the
kernel requires it for an unprivileged filter, and it must hold anyway so that a setuid binary
cannot shed the filter's intent); setting it again is harmless. A filter is inherited by
``fork``, ``clone`` and kept across ``execve``; it cannot be removed, only added to.

No ctypes, logging or threading here: this module is imported in the zygote, whose children
pay for every imported module.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import errno
import functools
import os
import struct

from .. import _syscalls

# linux/audit.h: seccomp_data.arch of the native ABI.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h

# linux/seccomp.h
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
PR_SET_NO_NEW_PRIVS = 38
BPF_MAXINSNS = 4096  # linux/bpf_common.h: the kernel refuses longer classic programs

# linux/filter.h, linux/bpf_common.h: the classic BPF opcodes this assembler emits.
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR = 0
_ARCH = 4
_ARGS = 16
_LOW = 0 if sys.byteorder == "little" else 4  # offset of an argument's low 32-bit word

# linux/sched.h: every flag that makes a new namespace. clone() reads only the low 32 bits of
# its flags (kernel_clone_args.flags = lower_32_bits(clone_flags)), so the mask covers them all.
# CLONE_NEWTIME (0x80) lies in clone()'s exit-signal byte, where no valid signal (1..64) sets it,
# so masking it refuses nothing honest; it is there so that the mask names every namespace
# (Docker's mask, 0x7E020000, leaves it out).
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEW_ANY = (CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
                 | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)  # fmt: skip

TIOCSTI = 0x5412  # asm-generic/ioctls.h (x86_64 and aarch64 alike)
TIOCLINUX = 0x541C
AF_ALG = 38  # linux/socket.h
AF_VSOCK = 40

# Syscall numbers: arch/x86/entry/syscalls/syscall_64.tbl (x86_64, checked against
# asm/unistd_64.h by tests/test_seccomp.py) and include/uapi/asm-generic/unistd.h (aarch64, and
# checked against asm-generic/unistd.h). None: the call does not exist on that architecture.
_NUMBERS: dict[str, tuple[int | None, int | None]] = {
    # name: (x86_64, aarch64)
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "process_madvise": (440, 440),
    "pidfd_getfd": (438, 438),
    "kcmp": (312, 272),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "syslog": (103, 116),
    "iopl": (172, None),
    "ioperm": (173, None),
    "modify_ldt": (154, None),
    "uselib": (134, None),
    "migrate_pages": (256, 238),
    "move_pages": (279, 239),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "vhangup": (153, 58),
    "lookup_dcookie": (212, 18),
    "clone3": (435, 435),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "clone": (56, 220),
    "ioctl": (16, 29),
    # A mode argument: (index of the mode argument, x86_64, aarch64) in _MODE_ARGUMENT below.
    "open": (2, None),
    "creat": (85, None),
    "chmod": (90, None),
    "fchmod": (91, 52),
    "mknod": (133, None),
    "openat": (257, 56),
    "mknodat": (259, 33),
    "fchmodat": (268, 53),
    "openat2": (437, 437),
    "fchmodat2": (452, 452),
    "socket": (41, 198),
    "socketpair": (53, 199),
}

# Refused whatever the arguments, with EPERM ("not allowed here"), each for a reason:
_EPERM = (
    # Keyrings: kernel-wide state shared with the host's other users of the same uid, and a
    # long list of kernel bugs (flatpak, Docker, firejail, BenchExec, isolate all refuse them).
    "add_key", "request_key", "keyctl",
    # Another process's memory, fds or kernel objects: the task's siblings run under the same
    # uid in some profiles (Docker refuses all six without CAP_SYS_PTRACE; flatpak refuses
    # ptrace outside its development mode).
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    # Kernel attack surface with a long CVE history and no converter's use: eBPF programs,
    # perf counters (also a side channel), userfaultfd (turns kernel races into reliable
    # exploits) -- Docker refuses all three without their capability.
    "bpf", "perf_event_open", "userfaultfd",
    # Namespaces and mounts, old and new API: the task's view is built before the filter and
    # must stay as built (flatpak: EPERM for unshare, setns, mount, umount2, pivot_root,
    # chroot; the new mount API there is ENOSYS, here EPERM like Docker's default).
    "unshare", "setns", "mount", "umount2", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "pivot_root", "chroot",
    # File handles: open_by_handle_at opens any inode of a mounted filesystem, bypassing the
    # task's mount view (the 2014 "shocker" escape from Docker); name_to_handle_at is its pair.
    "open_by_handle_at", "name_to_handle_at",
    # The machine itself: kernel loading, modules, accounting, quotas, swap, reboot, the kernel
    # log (which leaks kernel addresses; flatpak blocks it as "dmesg").
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "acct",
    "quotactl", "quotactl_fd", "swapon", "swapoff", "reboot", "syslog",
    # x86 port I/O and per-process LDT entries: raw hardware access and 16-bit segments, used by
    # DOS emulators and Wine, not by Python or a converter (Docker: iopl, ioperm; flatpak:
    # modify_ldt). On x86_64 only.
    "iopl", "ioperm", "modify_ldt",
    # uselib loads a.out libraries, an obsolete format (flatpak, Docker).
    "uselib",
    # Moving another process's pages between NUMA nodes (both take a pid; flatpak). The
    # own-process NUMA calls (mbind, get/set_mempolicy) stay: OpenMP runtimes and hwloc use
    # them, and they reach only the caller's memory.
    "migrate_pages", "move_pages",
    # Host-wide identity and clock: the UTS names and the wall clock (Docker refuses them
    # without CAP_SYS_ADMIN / CAP_SYS_TIME). Reading the clock and clock_adjtime (glibc's
    # ntp_gettime reads through it) stay.
    "sethostname", "setdomainname", "settimeofday", "clock_settime",
    # Hanging up the terminal (Docker without CAP_SYS_TTY_CONFIG); lookup_dcookie was an
    # oprofile interface needing CAP_SYS_ADMIN, gone since 6.8 (Docker).
    "vhangup", "lookup_dcookie",
)  # fmt: skip

# ENOSYS ("this kernel has no such call"), so that callers fall back rather than fail: glibc's
# clone3 -> clone (pthread_create, posix_spawn); io_uring users -> ordinary reads and writes.
_ENOSYS = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")


def _machine_column() -> tuple[int, int] | None:
    """(index into _NUMBERS' pairs, AUDIT_ARCH) of this machine, or None where unsupported."""
    machine = os.uname().machine
    if machine == "x86_64":
        return 0, AUDIT_ARCH_X86_64
    if machine in ("aarch64", "arm64"):
        return 1, AUDIT_ARCH_AARCH64
    return None


def _numbers(column: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for name, pair in _NUMBERS.items():
        number = pair[column]
        if number is not None:
            found[name] = number
    return found


def _denied(column: int) -> dict[str, str]:
    present = _numbers(column)
    text = {name: "EPERM" for name in _EPERM if name in present}
    text.update((name, "ENOSYS") for name in _ENOSYS)
    text["clone"] = "EPERM when flags (low 32 bits) have any CLONE_NEW* bit"
    text["ioctl"] = "EPERM for TIOCSTI and TIOCLINUX (the low 32 bits of the request)"
    text["socket"] = "EAFNOSUPPORT for AF_ALG and AF_VSOCK"
    text["socketpair"] = "EAFNOSUPPORT for AF_ALG and AF_VSOCK"
    for name in _MODE_ARGUMENT:
        if name in present:
            text[name] = "EPERM when the mode has S_ISUID or S_ISGID"
    if "openat2" in present:  # its mode is in memory the filter cannot read (as clone3's flags)
        text["openat2"] = "ENOSYS"
    return text


#: The argument holding a file mode, per call: a mode with S_ISUID or S_ISGID is refused. On a
#: handed (idmapped) folder the task acts as the manager, so a file it makes set-uid would be a
#: set-uid-root program on the host, for whoever runs it from there later.
_MODE_ARGUMENT = {
    "open": 2, "creat": 1, "chmod": 1, "fchmod": 1, "mknod": 1, "openat": 3, "mknodat": 2,
    "fchmodat": 2, "fchmodat2": 2,
}  # fmt: skip
_SET_ID_BITS = 0o6000  # S_ISUID | S_ISGID

_MACHINE = _machine_column()

DENIED: dict[str, str] = _denied(_MACHINE[0]) if _MACHINE else {}
"""Name -> what the filter answers, for this machine's architecture (empty where unsupported).
Besides these: any call of a foreign ABI (x86's i386 and x32 on x86_64) kills the process."""


class _Assembler:
    """Classic BPF with forward jumps to labels (BPF jumps only forward, by at most 255)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def emit(self, op: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((op, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def bytes(self) -> bytes:
        out = bytearray()
        for index, (op, jt, jf, k) in enumerate(self.code):
            offsets = [self._offset(index, target) for target in (jt, jf)]
            out += struct.pack("=HBBI", op, offsets[0], offsets[1], k)
        if not 0 < len(self.code) <= BPF_MAXINSNS:
            raise ValueError(f"seccomp program of {len(self.code)} instructions")
        return bytes(out)

    def _offset(self, index: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target!r} out of BPF's range: {offset}")
        return offset


_LEAF = 4  # compares in a row at the bottom of the search tree


def _dispatch(asm: _Assembler, pairs: list[tuple[int, str]], name: str) -> None:
    """Jump to the label of the syscall number in the accumulator, or to "allow": a binary
    search (JGE) down to short runs of JEQ. Why not one run of JEQ: when loading a filter the
    kernel emulates it once per syscall number, to find the calls it may allow without running
    it (the action cache, 5.11+: kernel/seccomp.c, seccomp_cache_prepare_bitmap); a search
    tree makes each of those runs, and each filtered call at run time, a few compares instead
    of up to one per denied call (libseccomp builds a tree too, SCMP_FLTATR_CTL_OPTIMIZE=2)."""
    if len(pairs) <= _LEAF:
        for index, (number, target) in enumerate(pairs):
            asm.emit(_JEQ_K, number, target, "allow" if index == len(pairs) - 1 else 0)
        return
    middle = len(pairs) // 2
    asm.emit(_JGE_K, pairs[middle][0], f"{name}.hi", 0)
    _dispatch(asm, pairs[:middle], f"{name}.lo")
    asm.label(f"{name}.hi")
    _dispatch(asm, pairs[middle:], f"{name}.hi")


def _build(column: int, audit_arch: int) -> bytes:
    numbers = _numbers(column)
    asm = _Assembler()
    # A foreign ABI numbers its calls differently: none of the checks below would mean anything.
    asm.emit(_LD_W_ABS, _ARCH)
    asm.emit(_JEQ_K, audit_arch, 0, "kill")
    asm.emit(_LD_W_ABS, _NR)
    if audit_arch == AUDIT_ARCH_X86_64:
        # x32 calls share AUDIT_ARCH_X86_64 and differ by this bit (Docker, systemd kill them).
        asm.emit(_JSET_K, X32_SYSCALL_BIT, "kill", 0)
    targets = {numbers[name]: "enosys" for name in _ENOSYS}
    targets.update((numbers[name], "eperm") for name in _EPERM if name in numbers)
    targets.update({numbers["clone"]: "clone", numbers["ioctl"]: "ioctl",
                    numbers["socket"]: "socket", numbers["socketpair"]: "socket"})  # fmt: skip
    targets.update((numbers[name], f"mode{index}") for name, index in _MODE_ARGUMENT.items()
                   if name in numbers)  # fmt: skip
    targets[numbers["openat2"]] = "enosys"
    _dispatch(asm, sorted(targets.items()), "nr")
    # clone(flags, ...): arg 0 on x86_64 and aarch64 alike (only s390 swaps the first two).
    asm.label("clone")
    asm.emit(_LD_W_ABS, _ARGS + 0 * 8 + _LOW)
    asm.emit(_JSET_K, CLONE_NEW_ANY, "eperm", "allow")
    # ioctl(fd, request): the kernel takes request as an unsigned int, so a request with junk
    # in the high word is still TIOCSTI: compare the low word only (flatpak, CVE-2019-10063).
    # TIOCSTI pushes input into the terminal, which its shell runs after the task exits;
    # TIOCLINUX does the same through a virtual console's selection (flatpak CVE-2023-28100,
    # snapd CVE-2023-1523).
    asm.label("ioctl")
    asm.emit(_LD_W_ABS, _ARGS + 1 * 8 + _LOW)
    asm.emit(_JEQ_K, TIOCSTI, "eperm", 0)
    asm.emit(_JEQ_K, TIOCLINUX, "eperm", "allow")
    # socket(family, ...), socketpair(family, ...): family is an int. AF_ALG exposes the
    # kernel's crypto code and AF_VSOCK the hypervisor's transport, both with exploits in the
    # wild (Docker refuses both; isolate refuses AF_VSOCK). EAFNOSUPPORT is what a kernel
    # built without them answers, which libraries already handle.
    asm.label("socket")
    asm.emit(_LD_W_ABS, _ARGS + 0 * 8 + _LOW)
    asm.emit(_JEQ_K, AF_ALG, "eafnosupport", 0)
    asm.emit(_JEQ_K, AF_VSOCK, "eafnosupport", "allow")
    # A file mode with the set-id bits (see _MODE_ARGUMENT): the mode is an int (low word).
    for index in sorted(set(_MODE_ARGUMENT.values())):
        asm.label(f"mode{index}")
        asm.emit(_LD_W_ABS, _ARGS + index * 8 + _LOW)
        asm.emit(_JSET_K, _SET_ID_BITS, "eperm", "allow")
    asm.label("allow")
    asm.emit(_RET_K, SECCOMP_RET_ALLOW)
    asm.label("eperm")
    asm.emit(_RET_K, SECCOMP_RET_ERRNO | errno.EPERM)
    asm.label("enosys")
    asm.emit(_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    asm.label("eafnosupport")
    asm.emit(_RET_K, SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT)
    asm.label("kill")
    asm.emit(_RET_K, SECCOMP_RET_KILL_PROCESS)
    return asm.bytes()


@functools.cache  # built once per slot (in the zygote), loaded by each task
def program(log: bool = False) -> bytes:
    """The filter as ``struct sock_filter[]`` bytes for this machine's architecture.

    ``log`` does not change the instructions today (logging is a flag of ``load``); it is part
    of the key so that the program and its load flags are chosen together. Raises ``OSError``
    (ENOSYS) on an architecture without a syscall table here."""
    if _MACHINE is None:
        machine = os.uname().machine
        raise OSError(errno.ENOSYS, f"seccomp: no syscall table for {machine}")
    return _build(*_MACHINE)


def load(prog: bytes, log: bool = False) -> None:
    """Load ``prog`` on every thread of this process (SECCOMP_FILTER_FLAG_TSYNC); with ``log``
    also SECCOMP_FILTER_FLAG_LOG, so that refused calls reach the kernel log (see above).

    Sets PR_SET_NO_NEW_PRIVS first (required for an unprivileged filter; idempotent). Raises
    ``OSError`` naming the step that failed; the process is then unfiltered."""
    error = _syscalls.prctl(PR_SET_NO_NEW_PRIVS, 1)
    if error:
        raise OSError(error, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(error)}")
    flags = SECCOMP_FILTER_FLAG_TSYNC | (SECCOMP_FILTER_FLAG_LOG if log else 0)
    error = _syscalls.seccomp_load(prog, flags)
    if error:
        what = f"seccomp(SET_MODE_FILTER, {flags:#x}, {len(prog) // 8} instructions)"
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _probe_child() -> str:
    pid = os.getpid()
    try:
        load(program())
    except OSError as error:
        return str(error)
    refused = _syscalls.unshare(CLONE_NEWUSER)
    if refused != errno.EPERM:
        return f"unshare(CLONE_NEWUSER) after the filter gave {errno.errorcode.get(refused, 0)}"
    if os.getpid() != pid:
        return "getpid() after the filter changed"
    return "ok"


def probe() -> bool | str:
    """True when the filter loads and works here (tried in a throwaway forked child: it refuses
    unshare(CLONE_NEWUSER) with EPERM and getpid still answers); otherwise why not."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as error:
        os.close(read_fd)
        os.close(write_fd)
        return f"fork: {error}"
    if pid == 0:  # pragma: no cover - the child
        answer = "child failed"
        try:
            os.close(read_fd)
            answer = _probe_child()
        except BaseException as error:  # a forked child never returns into the caller
            answer = repr(error)
        finally:
            try:
                os.write(write_fd, answer.encode()[:4000])
            finally:
                os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        answer = reader.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"the probe child was killed by signal {os.WTERMSIG(status)} ({answer or 'silent'})"
    return True if answer == "ok" else answer or "the probe child said nothing"
