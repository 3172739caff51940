"""The systemd manager's bus: which one this process may use, and the few calls we make.

The bus is the system manager's as root, else the user's own manager (``--user``); directly on
systemd's private socket when there is no bus daemon. ``pystemd`` is imported lazily (the
optional extra ``[systemd]``).
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # Linux only: mypy --platform win32/darwin skips it

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..._errors import SandboxrunError
from .. import cgroupfs

log = logging.getLogger("sandboxrun.systemd")

#: How long systemd may take to start or remove a unit (PID 1 may be busy; TCG guests are slow).
JOB_TIMEOUT = 60.0
PREFIX = cgroupfs.RUNNER_PREFIX  # "sandboxrun-": units, like runner cgroups, carry our pid

_DEST = b"org.freedesktop.systemd1"
_PATH = b"/org/freedesktop/systemd1"
_MANAGER = b"org.freedesktop.systemd1.Manager"


class Target:
    """How to reach the systemd manager this process may use."""

    def __init__(self, user: bool, address: bytes | None, peer_to_peer: bool, where: str) -> None:
        self.user = user  # the user's own manager (not the system's)
        self.address = address  # None: libsystemd's default for the system/user bus
        self.peer_to_peer = peer_to_peer  # systemd's private socket: no bus daemon in between
        self.where = where

    def connect(self) -> Any:
        from pystemd.dbuslib import DBus, DBusAddress

        if self.address is None:
            return DBus(user_mode=self.user)
        return DBusAddress(self.address, peer_to_peer=self.peer_to_peer)


def target() -> Target | str:
    """The system manager as root, else the user manager; a sentence when there is no bus."""
    if os.geteuid() == 0:
        if os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or os.path.exists(
            "/run/dbus/system_bus_socket"
        ):
            return Target(False, None, False, "system bus")
        if os.path.exists("/run/systemd/private"):  # no dbus daemon: systemctl's own way in
            return Target(False, b"unix:path=/run/systemd/private", True, "/run/systemd/private")
        return "no system bus (/run/dbus/system_bus_socket) and no /run/systemd/private"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    if os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return Target(True, None, False, "user bus ($DBUS_SESSION_BUS_ADDRESS)")
    if os.path.exists(f"{runtime}/bus"):
        return Target(True, f"unix:path={runtime}/bus".encode(), False, f"{runtime}/bus")
    if os.path.exists(f"{runtime}/systemd/private"):  # a user manager without a user bus
        address = f"unix:path={runtime}/systemd/private".encode()
        return Target(True, address, True, f"{runtime}/systemd/private")
    return (
        f"no bus for this user (uid {os.geteuid()}): neither $DBUS_SESSION_BUS_ADDRESS nor "
        f"{runtime}/bus nor {runtime}/systemd/private; is user@{os.geteuid()}.service running "
        "(`loginctl enable-linger`)?"
    )


def property_args(properties: Iterable[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """``a(sv)`` for pystemd's call_method, from (name, D-Bus signature, value) triples.

    Spelled out here instead of pystemd's KNOWN_UNIT_SIGNATURES, which lacks ``PIDs`` and
    ``OOMPolicy`` (still in 0.15) and would have to be patched process-wide.
    """
    from pystemd.dbuslib import apply_signature

    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for name, signature, value in properties:
        args += [(ord("r"), b"sv"), (ord("s"), name.encode()), (ord("v"), signature.encode())]
        args += apply_signature(signature.encode(), [value])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


class Bus:
    """One connection to the systemd manager, subscribed to JobRemoved and UnitRemoved."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._bus = target.connect()
        self._bus.open()
        self._open = True
        self.jobs: dict[bytes, bytes] = {}  # finished job path -> result ("done", "failed", ...)
        self.watched: set[str] = set()  # units with a job of ours under way
        self.removed: set[str] = set()  # our units systemd has dropped
        self._ours = f"{PREFIX}{os.getpid()}-"  # signals about other units are dropped
        try:
            # Directly on systemd's private socket there is no bus daemon and no sender name.
            sender = None if target.peer_to_peer else _DEST
            # pystemd keeps no reference to a callback: we must.
            self._callbacks = {
                b"JobRemoved": self._job_removed(),
                b"UnitRemoved": self._unit_removed(),
            }
            for member, callback in self._callbacks.items():
                self._bus.match_signal(sender, _PATH, _MANAGER, member, callback)
            self.call(b"Subscribe")  # systemd sends unit and job signals only to subscribers
        except BaseException:
            self.close()
            raise

    def _job_removed(self) -> Callable[..., None]:
        def callback(message: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                message.process_reply(False)
                _, job, unit, result = message.body  # (u id, o job, s unit, s result)
            except Exception as failure:  # pystemd cannot surface it: a job may time out
                log.warning("unreadable JobRemoved signal (%s): a job may seem unfinished", failure)
                return
            if bytes(unit).decode() in self.watched:
                self.jobs[bytes(job)] = bytes(result)

        return callback

    def _unit_removed(self) -> Callable[..., None]:
        def callback(message: Any, error: Any = None, userdata: Any = None) -> None:
            try:
                message.process_reply(False)
                unit = bytes(message.body[0]).decode()  # (s id, o path)
            except Exception as failure:
                log.warning("unreadable UnitRemoved signal (%s): close() may wait longer", failure)
                return
            if unit.startswith(self._ours):
                self.removed.add(unit)

        return callback

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._open:  # sd_bus_unref twice would crash
            self._open = False
            self._bus.close()

    def call(self, method: bytes, signature: bytes = b"", values: list[Any] | None = None,
             extra: list[tuple[int, Any]] | None = None) -> Any:  # fmt: skip
        from pystemd.dbuslib import apply_signature

        args = apply_signature(signature, values or []) if signature else []
        args += extra or []
        return self._bus.call_method(_DEST, _PATH, _MANAGER, method, args).body

    def manager_property(self, name: bytes, signature: bytes) -> Any:
        return self._bus.get_property(_DEST, _PATH, _MANAGER, name, signature)

    def _pump(self, done: Callable[[], bool], timeout: float) -> bool:
        """Dispatch incoming signals until ``done()`` or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self._bus.process()  # one message per call; wait() returns at once if more queued
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._bus.wait(int(min(left, 0.5) * 1e6))

    def _job(self, unit: str, method: bytes, values: list[Any], extra: list[Any]) -> str | None:
        """Call a method that queues a job for ``unit``; its result once JobRemoved came."""
        self.watched.add(unit)
        try:
            job = bytes(self.call(method, b"ss", values, extra))
            if not self._pump(lambda: job in self.jobs, JOB_TIMEOUT):
                return None
            return self.jobs.pop(job).decode()
        finally:
            self.watched.discard(unit)

    def start_scope(self, unit: str, properties: list[tuple[str, str, Any]]) -> None:
        """StartTransientUnit, then wait for its job's JobRemoved; raise unless "done"."""
        extra = [*property_args(properties), (ord("a"), b"(sa(sv))"), (-1, None)]  # no aux
        log.debug("StartTransientUnit %s %s", unit, properties)
        try:
            result = self._job(unit, b"StartTransientUnit", [unit.encode(), b"fail"], extra)
        except Exception as error:
            raise SandboxrunError(f"systemd refused to start {unit}: {error}") from error
        if result is None:
            raise SandboxrunError(
                f"systemd did not finish starting {unit} within {JOB_TIMEOUT:.0f}s "
                f"(see `journalctl -u {unit}`)"
            )
        if result != "done":
            self.reset_failed(unit)
            raise SandboxrunError(
                f"systemd could not start {unit}: job result {result!r} "
                f"(see `journalctl -u {unit}`)"
            )

    def attach(self, unit: str, subcgroup: str, pids: list[int]) -> None:
        log.debug("AttachProcessesToUnit %s %s %s", unit, subcgroup, pids)
        self.call(b"AttachProcessesToUnit", b"ssau", [unit.encode(), subcgroup.encode(), pids])

    def units(self, pattern: str) -> list[tuple[str, str]]:
        """(name, active state) of the loaded units matching ``pattern``."""
        found = self.call(b"ListUnitsByPatterns", b"asas", [[], [pattern.encode()]]) or []
        return [(bytes(row[0]).decode(), bytes(row[3]).decode()) for row in found]  # row: tuple

    def reset_failed(self, unit: str) -> None:
        try:
            self.call(b"ResetFailedUnit", b"s", [unit.encode()])
        except Exception as error:  # not failed, or already gone: fine
            log.debug("ResetFailedUnit %s: %s", unit, error)

    def stop(self, unit: str) -> None:
        """StopUnit and wait for its job (systemd kills what is still inside)."""
        log.debug("StopUnit %s", unit)
        try:
            self._job(unit, b"StopUnit", [unit.encode(), b"replace"], [])
        except Exception as error:  # not loaded (any more): fine
            log.debug("StopUnit %s: %s", unit, error)

    def wait_removed(self, units: set[str], timeout: float) -> set[str]:
        """Wait until systemd has dropped ``units``; return the ones still there."""
        self._pump(lambda: units <= self.removed, timeout)
        left = units - self.removed
        self.removed -= units
        return left


def reap_stale(bus: Bus) -> None:
    """Stop the units of runners that died (SIGKILLed managers): nothing watches those tasks."""
    for unit, _ in bus.units(f"{PREFIX}*"):
        if cgroupfs.is_stale(unit):
            log.info("stopping %s: its runner (pid %s) is gone", unit, cgroupfs.runner_owner(unit))
            bus.stop(unit)
            bus.reset_failed(unit)
