"""``Isolation``: what a task may not do, named in systemd.exec(5)'s vocabulary.

Portable (pure data): the manager builds and validates a profile on every platform; only the
Linux step modules (``_mounts``, ``_privileges``, ``_idmap``, ``_seccomp``) act on it. The rule of
the default profile is **a task gets what it was handed** (docs/security.md). The three
built-in profiles:

- ``"none"``: the task shares the manager's uid, namespaces and files (a fork, limits only).
- ``"default"``: never host root -- an unprivileged uid per worker slot (``user="slot"``) --
  and the paths its call names, its working folder and ``read_write_paths`` mounted idmapped
  (``hand_paths``: it acts on those as the manager would, ``handed.py`` says which); everything
  else as an unprivileged local user meets it: ``ProtectSystem=full`` (``/usr``, ``/etc``,
  ``/boot``, the Python installation and sandboxrun's own code read-only),
  ``ProtectKernelTunables``, ``ProtectControlGroups`` (its own cgroup namespace), the host's
  ``/tmp`` and ``/var/tmp``, a private minimal ``/dev`` (``PrivateDevices``), ``PrivateIPC``, the
  system's socket directories hidden, a session of its own (no controlling terminal), every
  capability dropped, ``NoNewPrivileges``, a seccomp filter, ``LimitCORE=0``; the manager's
  environment, as under fork.
- ``"strict"``: as default plus ``ProtectSystem=strict`` (``/`` read-only but
  ``read_write_paths`` and the private ``/tmp``), ``PrivateTmp``, ``PrivateNetwork`` (loopback
  only), an allowlisted environment, and nothing handed automatically (only
  ``read_write_paths``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

ProtectSystem = Literal["full", "strict"]
User = Literal["slot"] | tuple[int, int] | None

#: The manager's variables a task sees by default: enough for locales, a PATH to find commands
#: and a HOME some libraries insist on; no tokens, no proxies with credentials, no PYTHON*
#: (a PYTHONPATH could load code the manager did not choose).
DEFAULT_ENVIRONMENT = (
    "PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "LC_NUMERIC",
    "LC_TIME", "LC_COLLATE", "TZ", "TERM", "USER", "LOGNAME", "SHELL", "TMPDIR",
)  # fmt: skip
#: Directories that hold the system's unix sockets: a read-only mount does not stop connect()
#: (measured), so they are covered by an empty tmpfs instead (systemd's InaccessiblePaths=).
DEFAULT_HIDDEN_SOCKETS = ("/run", "/var/run", "/tmp/.X11-unix", "/var/lib/docker")
#: First uid/gid of the per-slot task users (isolate's scheme: base + slot). Chosen above the
#: usual login (1000+) and system (< 1000) ranges and below nobody (65534); owns no file.
DEFAULT_UID_BASE = 61000


@dataclasses.dataclass(frozen=True)
class Isolation:
    """One isolation profile; each field is a measure that can be turned on alone."""

    name: str = "custom"
    protect_system: ProtectSystem | None = "full"
    protect_kernel_tunables: bool = True  # /sys, /proc/sys, /proc/sysrq-trigger read-only
    protect_control_groups: bool = True  # /sys/fs/cgroup read-only
    # Own cgroup namespace, cgroup2 remounted to show only the task's cgroup (systemd 257's
    # ProtectControlGroups=strict): a root task cannot name another cgroup for CLONE_INTO_CGROUP.
    private_cgroups: bool = True
    private_tmp: bool = False  # tmpfs on /tmp and /var/tmp (gone with the task)
    # A tmpfs /dev with null, zero, full, random, urandom, tty, a new devpts, fd/std* links and
    # its own /dev/shm: no host device (loop, KVM, vcs, disks, other ptys) is reachable.
    private_dev: bool = True
    new_session: bool = True  # setsid(): no controlling terminal (TIOCSTI, the operator's tty)
    seccomp: bool = True  # the syscall filter of _seccomp.py, loaded in the task's own process
    # Each call the filter refuses written to the kernel log (audit type=1326, syscall=NNN):
    # how to see which call a task was refused (docs/security.md).
    seccomp_log: bool = False
    # Mount what the task's call names idmapped (handed.py), so a task running as another uid
    # acts on it as the manager would. Root managers only (a non-root manager's task keeps its
    # uid, so it has nothing to map).
    hand_paths: bool = True
    private_ipc: bool = True  # own SysV IPC and POSIX mqueue namespace
    private_network: bool = False  # own network namespace, loopback only
    hide_sockets: tuple[str, ...] = DEFAULT_HIDDEN_SOCKETS
    no_new_privileges: bool = True
    drop_capabilities: bool = True  # bounding, ambient, inheritable, effective, permitted
    user: User = "slot"  # "slot": uid_base + slot; (uid, gid); None: keep the manager's
    uid_base: int = DEFAULT_UID_BASE
    read_write_paths: tuple[str, ...] = ()  # writable under strict; visible through /tmp
    # Visible (read-only) through the private /tmp: what the tasks run (a command's script, a
    # checkout under /tmp). The Python installation and sys.path are always kept visible.
    read_only_paths: tuple[str, ...] = ()
    environment: tuple[str, ...] | None = None  # an allowlist; None: the manager's, whole
    max_open_files: int | None = None  # RLIMIT_NOFILE (hard = soft)
    max_file_size: int | None = None  # RLIMIT_FSIZE in bytes (hard = soft)
    core: int | None = 0  # RLIMIT_CORE: no core dumps of a task's memory

    def __post_init__(self) -> None:
        if self.protect_system not in (None, "full", "strict"):
            raise ValueError(
                f"protect_system must be 'full', 'strict' or None, got {self.protect_system!r}"
            )
        if self.user is not None and self.user != "slot":
            uid, gid = self.user  # a pair of ints, anything else is a mistake
            if not (isinstance(uid, int) and isinstance(gid, int) and uid >= 0 and gid >= 0):
                raise ValueError(f"user must be 'slot', (uid, gid) or None, got {self.user!r}")
        for path in (*self.read_write_paths, *self.read_only_paths, *self.hide_sockets):
            if not path.startswith("/"):
                raise ValueError(f"isolation paths must be absolute, got {path!r}")
        limits = {"max_open_files": self.max_open_files, "max_file_size": self.max_file_size}
        for name, value in {**limits, "core": self.core}.items():
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")

    @property
    def enabled(self) -> bool:
        """False for ``"none"``: nothing of this package runs for the task."""
        return self != NONE

    def uid_gid(self, slot: int) -> tuple[int, int] | None:
        """The task's (uid, gid) for worker ``slot``, or None to keep the manager's."""
        if self.user is None:
            return None
        if self.user == "slot":
            return self.uid_base + slot, self.uid_base + slot
        return self.user

    def with_paths(
        self, read_write_paths: Iterable[str], read_only_paths: Iterable[str] = ()
    ) -> Isolation:
        """This profile with more writable paths (``sandboxrun batch`` adds its output dir) and
        more paths kept visible read-only (the command's own files)."""
        paths = tuple(dict.fromkeys((*self.read_write_paths, *read_write_paths)))
        seen = tuple(dict.fromkeys((*self.read_only_paths, *read_only_paths)))
        return dataclasses.replace(self, read_write_paths=paths, read_only_paths=seen)


NONE = Isolation(
    name="none", protect_system=None, protect_kernel_tunables=False, protect_control_groups=False,
    private_cgroups=False, private_tmp=False, private_ipc=False, hide_sockets=(),
    no_new_privileges=False, drop_capabilities=False, environment=None, core=None,
    private_dev=False, new_session=False, seccomp=False, hand_paths=False, user=None,
)  # fmt: skip
DEFAULT = Isolation(name="default")
STRICT = Isolation(
    name="strict", protect_system="strict", private_network=True, private_tmp=True,
    environment=DEFAULT_ENVIRONMENT, hand_paths=False,
)  # fmt: skip
PROFILES = {"none": NONE, "default": DEFAULT, "strict": STRICT}


def resolve(value: str | Isolation | None) -> Isolation:
    """``ProcessManager(isolation=...)``: a profile name, an ``Isolation``, or None (default)."""
    if value is None:
        return DEFAULT
    if isinstance(value, Isolation):
        return value
    if isinstance(value, str) and value in PROFILES:
        return PROFILES[value]
    raise ValueError(
        f"isolation must be one of {sorted(PROFILES)} or a sandboxrun.Isolation, got {value!r}"
    )
