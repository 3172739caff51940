"""The measuring interpreter: ``--one TOOL CASE PARAMS_JSON`` runs one case (or, for the tool
``floor``, one floor measurement) and prints one ``BENCH-RESULT {json}`` line.

Started by ``run.spawn_one`` as ``python -c 'import bench.child ...'`` so that the package is
imported from cached bytecode and nothing else (no argparse, no report) is loaded here.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

RESULT_MARK = "BENCH-RESULT "


def one(tool: str, case: str, params: dict[str, Any]) -> dict[str, Any]:
    if tool == "floor":
        from .floor import FLOORS

        return FLOORS[case](params)
    from .cases import CASES
    from .tools import IMPORTS, SANDBOXRUN_IMPORTS, SANDBOXRUN_LINUX_IMPORTS

    # Imports are not what is measured: do them before any clock or rusage is read.
    linux = SANDBOXRUN_LINUX_IMPORTS if sys.platform.startswith("linux") else ()
    for module in IMPORTS.get(tool, SANDBOXRUN_IMPORTS + linux):
        importlib.import_module(module)
    return CASES[case](tool, params)


def _scratch_outside_tmp() -> None:
    """The cases' scratch files (pid files, logs) must be seen by the tasks, whose /tmp is
    private under sandboxrun's default isolation: put them next to the checkout instead."""
    import tempfile

    if tempfile.gettempdir().startswith(("/tmp", "/var/tmp")):
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              os.pardir, ".bench-tmp")  # fmt: skip
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:  # a read-only checkout: the tasks' own view decides
            return
        os.environ["TMPDIR"] = tempfile.tempdir = os.path.realpath(folder)


def main(argv: list[str]) -> int:
    """``argv``: ``["--one", TOOL, CASE, PARAMS_JSON]``. Never returns: ``os._exit``."""
    tool, case, params = argv[1], argv[2], json.loads(argv[3])
    _scratch_outside_tmp()
    try:
        result = one(tool, case, params)
    except BaseException as error:
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no exit-time joins of leftover children
