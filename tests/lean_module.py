"""A task module that imports nothing: what its tasks find in ``sys.modules`` is what the zygote
and the worker brought."""

from __future__ import annotations

import sys


def loaded_modules() -> list[str]:
    return sorted(sys.modules)


def syscalls_compiled() -> bool:
    from sandboxrun import _syscalls

    return _syscalls.NATIVE
