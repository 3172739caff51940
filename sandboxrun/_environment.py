"""The environment a task starts with: an allowlist of the manager's, plus what the user passes.

A server's environment holds its secrets (database URLs, API tokens, cloud credentials), and a
task that a hostile file took over can read every variable it was started with -- also through
``/proc/self/environ``, which ``os.environ.clear()`` does not wipe. So the zygote (a fresh
interpreter, see ``_zygote``) is started with this environment only, and every task inherits it.

Kept: what programs need to find things and to speak the user's language (``PATH``, ``HOME``,
locale and time zone, the temporary directory, the terminal type). Everything else must be
passed on purpose: ``ProcessManager(env={"NAME": "value"})``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        # Windows: what a process needs to start at all.
        "SYSTEMROOT",
        "SYSTEMDRIVE",
        "WINDIR",
        "COMSPEC",
        "PATHEXT",
        "TEMP",
        "TMP",
        "USERPROFILE",
    }
)
ALLOWED_PREFIXES = ("LC_",)


def allowed(name: str) -> bool:
    return name in ALLOWED or name.startswith(ALLOWED_PREFIXES)


def build(
    extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The task environment: the allowed variables of ``base`` (the manager's), then ``extra``."""
    source = os.environ if base is None else base
    environment = {name: value for name, value in source.items() if allowed(name)}
    environment.update(validate(extra))
    return environment


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
