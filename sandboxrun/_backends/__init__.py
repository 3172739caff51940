"""Backend detection: the strongest enforcement mechanism that works here, chosen once."""

from __future__ import annotations

import importlib
import inspect
import platform
import sys
from typing import Any

from .._errors import BackendUnavailable
from .base import Backend

# Strongest first. "auto" takes the first whose unavailable_reason() is None.
_REGISTRY: dict[str, str] = {
    "cgroup_v2": "sandboxrun._backends.cgroup_v2.backend:CgroupV2Backend",
    "systemd": "sandboxrun._backends.systemd.backend:SystemdBackend",
    "cgroup_v1": "sandboxrun._backends.cgroup_v1:CgroupV1Backend",
    "psutil": "sandboxrun._backends.psutil_monitor:PsutilBackend",
}
NAMES = ("auto", *_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    module, _, attr = _REGISTRY[name].partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), attr)
    return cls


def _reason(name: str) -> str | None:
    # The kernel backends are not even imported elsewhere (their modules are Linux-only).
    if name != "psutil" and not sys.platform.startswith("linux"):
        return f"needs Linux cgroups ({sys.platform} here)"
    return backend_class(name).unavailable_reason()


def _reasons() -> dict[str, str | None]:
    return {name: _reason(name) for name in _REGISTRY}


def create_backend(name: str = "auto", **options: Any) -> Backend:
    """The backend called ``name`` (or the strongest usable one for ``"auto"``), not yet opened."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        for candidate, reason in _reasons().items():
            if reason is None:
                return _instantiate(candidate, options)
        raise BackendUnavailable("no backend works here")  # psutil always does; defensive
    reason = _reason(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot work here: {reason}")
    return _instantiate(name, options)


def accepted_options(cls: type[Backend], options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``cls``'s constructor takes by keyword (the rest are another
    backend's, e.g. ``poll_interval_seconds`` is only the psutil backend's)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(options)
    keywords = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {key: value for key, value in options.items() if key in keywords}


def _instantiate(name: str, options: dict[str, Any]) -> Backend:
    cls = backend_class(name)
    return cls(**accepted_options(cls, options))


def detect() -> dict[str, Any]:
    """What ``backend="auto"`` picks here and why: every backend with its verdict and details."""
    reasons = _reasons()
    chosen = next(name for name, reason in reasons.items() if reason is None)
    backends: dict[str, Any] = {}
    for name, reason in reasons.items():
        entry: dict[str, Any] = {"available": reason is None, "reason": reason}
        if reason is None:
            instance = backend_class(name)()  # not opened: what it probed without writing
            entry["kernel_enforced"] = sorted(instance.kernel_enforced)
            entry["details"] = instance.details()
        backends[name] = entry
    return {
        "chosen": chosen,
        "platform": platform.platform(),
        "kernel": platform.release(),
        "backends": backends,
    }
