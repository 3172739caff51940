#!/usr/bin/env python3
"""Benchmarks: sandboxrun side by side with the Glasswall process manager and the Python peers.

The thin entry point of the ``bench`` package next to this file (``scripts/bench/``, whose
docstring describes the modules): ``python scripts/bench.py --help``.
"""

import sys

from bench.cli import main  # scripts/ is sys.path[0] when this file runs

if __name__ == "__main__":
    sys.exit(main())
