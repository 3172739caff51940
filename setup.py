"""The one compiled piece: sandboxrun._native, the zygote's PID 1 in C (Linux only).

Optional: where it cannot build (no compiler, no Python headers, not Linux) the install goes
on without it and the zygote runs its pure-Python PID 1 (sandboxrun/_zygote/reaper.py).
"""

import sys

from setuptools import Extension, setup

native = [Extension("sandboxrun._native", ["sandboxrun/_native.c"], optional=True)]
setup(ext_modules=native if sys.platform.startswith("linux") else [])
