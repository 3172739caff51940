"""The command line's helpers; ``sandboxrun/cli.py`` is the typer entry with thin commands.

    cli.py            run / batch / doctor, --verbose: parse arguments, call in here
    _cli/options.py   limits from the command line -> ProcessManager (one usage error per bad value)
    _cli/verdicts.py  a TaskResult -> exit code (``run``) and verdict (``batch``): one place
    _cli/template.py  --cmd: checked once, filled per argument, never read as an option
    _cli/inputs.py    the input folder -> regular files to run, and what was skipped and why
    _cli/journal.py   the MAC'd, append-only journal and what --resume may trust
    _cli/records.py   a TaskResult -> one JSON record; the summary table
    _cli/batch.py     the batch loop: inputs -> tasks -> manager -> journal -> summary

``doctor`` lives in ``sandboxrun/_doctor.py`` (it reports on the backends, not on the CLI).
"""
