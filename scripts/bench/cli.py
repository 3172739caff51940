"""The entry point: arguments, a snapshot of the sandboxrun being measured, the run, the report.

``--one TOOL CASE PARAMS_JSON`` is the measuring interpreter's mode (``child``); ``--from-json``
rewrites the report and plots from a saved run without measuring anything.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import GIB
from .plots import plots
from .report import Report
from .run import Runner, wait_for_quiet_machine

SCRIPTS = Path(__file__).resolve().parent.parent
DOCS = SCRIPTS.parent / "docs"
DESCRIPTION = (sys.modules[__package__].__doc__ or "").split("\n\n")[0]


def snapshot_sandboxrun(into: Path) -> dict[str, Any]:
    """Copy the sandboxrun package being measured and put the copy first on PYTHONPATH.

    Other people may commit to the checkout while a run goes on (an editable install would pick
    their changes up half-way); every measurement then uses the same code, named in the report.
    """
    spec = importlib.util.find_spec("sandboxrun")
    if spec is None or not spec.submodule_search_locations:
        return {}
    source = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(source, into / "sandboxrun", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((into / "sandboxrun").rglob("*.py")):
        digest.update(path.relative_to(into).as_posix().encode() + path.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(into), os.environ.get("PYTHONPATH")])
    )
    sys.path.insert(0, str(into))
    info: dict[str, Any] = {"source": str(source), "sha256": digest.hexdigest()[:12]}

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(source.parent), *command],
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit:
        info["commit"] = commit
        info["dirty"] = bool(git("status", "--porcelain", "--", str(source)))
    return info


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("sandboxrun", "glasswall", "pebble", "psutil", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_report(data: dict[str, Any], meta: dict[str, Any], out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    skipped = plots(data, out)
    data["plots"] = skipped is None
    notes = [n for n in meta.get("notes", []) if not n.startswith("plots skipped")]
    if skipped:
        notes.append(f"plots skipped: {skipped}")
    (out / "benchmarks.md").write_text(Report(data, meta | {"notes": notes}, quick).render())
    print(f"wrote {out / 'benchmarks.md'}", file=sys.stderr)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, seconds")
    parser.add_argument("--only", help="comma-separated: sandboxrun, glasswall, pebble, ppe, or "
                        "sandboxrun-BACKEND")  # fmt: skip
    parser.add_argument(
        "--out",
        type=Path,
        default=DOCS,
        help="where benchmarks.md and the PNGs go (default: docs/)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--json", type=Path, help="also save the raw measurements here")
    parser.add_argument(
        "--no-wait", action="store_true", help="do not wait for a running qemu VM before a full run"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: rewrite the report and plots from a --json file",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",")] if args.only else None
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        from .child import main as one

        return one(argv)
    args = parse(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_report(saved["data"], saved["meta"], args.out, saved["meta"].get("quick", False))
        return 0

    notes: list[str] = []
    # A SIGTERM (e.g. `kill` of a long run) still removes the temporary copy below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Outside /tmp: a task's /tmp is private under the default and strict isolation (the
    # profiles' section measures both), and strict's probe refuses a sandboxrun found there.
    scratch = SCRIPTS.parent / ".bench-tmp"
    with contextlib.suppress(OSError):
        scratch.mkdir(exist_ok=True)
    snapshot_dir = tempfile.TemporaryDirectory(
        prefix="bench-sandboxrun-", dir=scratch if os.access(scratch, os.W_OK) else None
    )
    snapshot = snapshot_sandboxrun(Path(snapshot_dir.name))
    # The measuring processes import this package as ``bench``, with its bytecode cached.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(SCRIPTS)])
    )
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(snapshot_dir.name) / "pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    runner = Runner(args, notes)
    if runner.guard:
        waited = wait_for_quiet_machine(notes)
        if waited:
            notes.append(f"waited {waited:.0f} s for a qemu VM (another engineer's tests) first")
        runner.waited = waited
    started = time.monotonic()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data = runner.run()
    if runner.waited or runner.redone:
        notes.append(
            f"qemu VMs (other engineers' tests): {runner.waited:.0f} s waited in all;"
            f" measurements that overlapped one and were taken again: {runner.redone}"
        )
    snapshot_dir.cleanup()
    meta = machine() | {
        "sandboxrun_snapshot": snapshot,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "duration_s": time.monotonic() - started,
        "notes": notes,
        "quick": args.quick,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "data": data}, indent=1))
    write_report(data, meta, args.out, args.quick)
    return 0
