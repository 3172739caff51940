"""Benchmarks: sandboxrun side by side with the Glasswall process manager and the Python peers.

    python scripts/bench.py                   # full run, writes docs/benchmarks.md and docs/*.png
    python scripts/bench.py --quick --only sandboxrun --out /tmp/x   # seconds, sandboxrun only

Every measurement of every tool runs in a fresh interpreter: the orchestrator starts
``python -c 'import bench.child ...' --one TOOL CASE PARAMS_JSON`` and reads back one
``BENCH-RESULT {json}`` line, so no tool shares imports, threads or memory with another, and a
"parent peak memory" is the measuring subprocess's own ``ru_maxrss``. The peers (glasswall,
pebble) and matplotlib are optional: a tool that is not installed is reported as n/a, and the
plots are skipped.

The package, one concern per module (the entry point first, the leaves last)::

    cli        argument parsing, the sandboxrun snapshot, writing the report (the entry point)
    run        the orchestrator: sizes, rounds, one fresh interpreter per measurement
    child      the measuring interpreter (``--one``): imports, then one case or floor
    cases      one measurement of one tool (throughput, cpu, strict, peak, timeout, ...)
    cpu_limit  sandboxrun's CPU-time limit: its overhead on trivial tasks, its kill accuracy
    isolation  what isolation="none" / "default" / "strict" cost a trivial task (section 10)
    scaleout   SandboxExecutor next to ProcessManager, Dask one worker vs two (section 9)
    tools      the adapters: each tool runs a batch of calls and returns one outcome per task
    tasks      the task functions (module level, picklable, stdlib only, cheap to import)
    floor      the physical floor: bare fork, cgroup v1 mkdir/enter/rmdir (no sandboxrun)
    figures    reading rounds out of the raw data and typesetting numbers and tables
    report     docs/benchmarks.md: the header, the targets and their verdicts
    sections   the measured sections of the report (1-7, the floor) and their data accessors
    cpu_section  section 8 (the cpu_limit cases)
    isolation_section  section 10 (the isolation case)
    plots      the two PNGs (matplotlib, optional)

Keep this file and ``tasks`` light (stdlib only): under ``forkserver`` every task process of
``ProcessPoolExecutor`` imports ``bench.tasks`` to find the function it runs.
"""

MIB = 1 << 20
GIB = 1 << 30
