"""A stand-in for the launcher in the isolation tests: the steps in their real order.

    [test, as the zygote: prepare_view(profile), held across calls]
    test --fork--> child: [enter cgroups] unshare(NEWPID) --fork--> PID 1 (root):
        setup_namespaces_and_mounts(profile) --fork--> PID 2: drop_privileges(profile, slot),
        then ``func(*args)``; its pickled ("ok", value) / ("raised", repr) comes back on a pipe.

Hostile code runs only in PID 2. The test process is the "manager" only for what it owns
(files, sockets, a victim process); attacks on a real manager go through ProcessManager in a
subprocess with a watchdog. ``PREPARED_VIEW`` (set per test by test_isolation's ``view``
fixture): PID 1 enters the test process's prepared view, as under the zygote, or builds its
whole view itself, as under fork and for a non-root manager.
"""

from __future__ import annotations

import os
import pickle
import select
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from sandboxrun._isolation import Isolation

PREPARED_VIEW = True

if sys.platform.startswith("linux"):
    from sandboxrun._isolation import _libc, isolate_cgroups
    from sandboxrun._isolation._mounts import (
        enter_user_namespace,
        prepare_view,
        setup_namespaces_and_mounts,
    )
    from sandboxrun._isolation._privileges import drop_privileges
    from sandboxrun._isolation._probe import fork_call


def _enter(files: Sequence[str]) -> None:
    for path in files:
        with open(path, "w") as file:
            file.write("0")


def _pid2(profile: Isolation, slot: int, func: Callable[..., Any], args: tuple[Any, ...],
          write_fd: int) -> None:  # fmt: skip
    try:
        drop_privileges(profile, slot)
        outcome: tuple[str, Any] = ("ok", func(*args))
    except BaseException as error:
        outcome = ("raised", f"{type(error).__name__}: {error}")
    os.write(write_fd, pickle.dumps(outcome))


def _pid1(profile: Isolation, slot: int, func: Callable[..., Any], args: tuple[Any, ...],
          write_fd: int) -> None:  # fmt: skip
    try:
        setup_namespaces_and_mounts(profile)
        isolate_cgroups(profile)  # the launchers' order: after the mounts, before the task
    except OSError as error:
        os.write(write_fd, pickle.dumps(("setup failed", str(error))))
        return
    os.waitpid(fork_call(_pid2, profile, slot, func, args, write_fd), 0)


def _outer(profile: Isolation, slot: int, func: Callable[..., Any], args: tuple[Any, ...],
           write_fd: int, read_fd: int, enter: Sequence[str]) -> None:  # fmt: skip
    os.close(read_fd)
    _enter(enter)
    if profile.enabled:
        if os.geteuid() != 0:  # a pid namespace needs a user namespace first
            enter_user_namespace()
        _libc.unshare(_libc.CLONE_NEWPID)
    os.waitpid(fork_call(_pid1, profile, slot, func, args, write_fd), 0)


def run_isolated(
    profile: Isolation,
    func: Callable[..., Any],
    *args: Any,
    slot: int = 0,
    enter: Sequence[str] = (),
    timeout: float = 20.0,
) -> tuple[str, Any]:
    """Run ``func(*args)`` as an isolated task; (``"ok"``, value) or (``"raised"``, text)."""
    if PREPARED_VIEW:
        prepare_view(profile)
    read_fd, write_fd = os.pipe()
    pid = fork_call(_outer, profile, slot, func, args, write_fd, read_fd, enter)
    os.close(write_fd)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.1)
            if ready:
                chunk = os.read(read_fd, 1 << 20)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(read_fd)
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    if not data:
        return ("no answer", None)
    outcome: tuple[str, Any] = pickle.loads(data)
    return outcome
