"""The environment a task starts with -- the one builder, for every start method and profile.

Portable. The manager's environment, as a forked worker would have it (Glasswall-shaped code
configures its converter through environment variables), with ``env=`` on top; a profile with
an ``environment`` allowlist (strict) keeps only the variables it names. The zygote is exec'd
with the result (so ``/proc/self/environ`` of a task holds nothing else: clearing
``os.environ`` after a fork does not change the kernel's copy, measured); fork, spawn and
forkserver workers replace ``os.environ`` with it before the task's code.

Secrets in the manager's environment reach the tasks under ``none`` and ``default``: the price
of the drop-in (docs/security.md). ``strict`` scrubs them.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Callable, Mapping

from .profile import Isolation


def validate(extra: Mapping[str, str] | None) -> dict[str, str]:
    """``env=`` as given, checked: names and values are non-empty-name strings without NUL."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"env must be a mapping of str to str, got {type(extra).__name__}")
    checked = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"env must map str to str, got {name!r}: {value!r}")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"env: {name!r} is not a valid environment variable name/value")
        checked[name] = value
    return checked


def build_environment(
    profile: Isolation,
    extra: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The task's environment: ``source`` (default ``os.environ``) filtered by the profile's
    allowlist (shell patterns such as ``LC_*`` allowed), then ``extra`` on top.

    ``profile.environment is None`` keeps ``source`` whole (``isolation="none"``).
    """
    source = os.environ if source is None else source
    if profile.environment is None:
        kept = dict(source)
    else:
        allowed = matcher(profile.environment)
        kept = {key: value for key, value in source.items() if allowed(key)}
    kept.update(validate(extra))
    return kept


@functools.lru_cache(maxsize=16)
def matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regex for the allowlist. Compiled in the manager (``choose`` calls it), so
    forked workers inherit it: compiling per task cost 1.9 ms of the fork path's setup."""
    return re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns)).match


def replace_environment(environment: Mapping[str, str]) -> None:
    """Make ``os.environ`` (what subprocess and os.getenv see) exactly ``environment``."""
    os.environ.clear()
    os.environ.update(environment)
