"""The raw Linux syscalls Python 3.10/3.11 lacks, chosen once at import (psutil style).

Compiled (``sandboxrun._native``) where it was built, else through ctypes
(``_ctypes_syscalls``, the same names and results): ``unshare``, ``setns``, ``mount``,
``mount_setattr``, ``idmapped_tree`` (a new fd, or minus the errno), ``attach_tree``,
``prctl``, ``capset_empty``, ``seccomp_load``, each returning 0 or the errno.
The callers (``_linux``, ``_isolation._libc``, ``_isolation._seccomp``) word the ``OSError``.

Why not ctypes everywhere: a zygote's task makes these calls in a fresh child, and ctypes' first
calls there write pages of its own state (converters, errno, the CDLL's cache) -- a copy-on-write
fault each, and ctypes itself is 15 more mappings for every fork to copy (measured in PID 2,
default profile: entering the view 301 -> 167 us, the /proc step 224 -> 105, the privilege drop
171 -> 69). ``SANDBOXRUN_NATIVE=0`` at import selects ctypes in that process only: a zygote gets
the allowlisted environment, so its tasks use the compiled ones wherever they are built. The
ctypes twins are tested beside them (tests/test_syscalls.py) and run end to end where the
extension is not built.
"""

from __future__ import annotations

import os
import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

if os.environ.get("SANDBOXRUN_NATIVE") == "0":
    from . import _ctypes_syscalls as _chosen
else:
    try:
        from . import _native as _chosen  # type: ignore[no-redef]
    except ImportError:  # not built (no compiler at install)
        from . import _ctypes_syscalls as _chosen
NATIVE = _chosen.__name__.endswith("._native")

attach_tree = _chosen.attach_tree
capset_empty = _chosen.capset_empty
idmapped_tree = _chosen.idmapped_tree
mount = _chosen.mount
mount_setattr = _chosen.mount_setattr
prctl = _chosen.prctl
seccomp_load = _chosen.seccomp_load
setns = _chosen.setns
unshare = _chosen.unshare

__all__ = [
    "NATIVE",
    "attach_tree",
    "capset_empty",
    "idmapped_tree",
    "mount",
    "mount_setattr",
    "prctl",
    "seccomp_load",
    "setns",
    "unshare",
]
