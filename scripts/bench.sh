#!/usr/bin/env bash
# Benchmarks: sandboxrun next to the Glasswall process manager, pebble and ProcessPoolExecutor.
# Makes a separate venv (.bench-venv, gitignored: the peers are not project dependencies), then
# runs scripts/bench.py, which writes docs/benchmarks.md and docs/bench-*.png.
# Arguments go to bench.py (e.g. --quick, --only sandboxrun,glasswall, --rounds 1).
# Env: PYTHON (default python3).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.bench-venv"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
"$venv/bin/python" -m pip install -q -e "$repo[dask]" glasswall pebble matplotlib
exec "$venv/bin/python" "$repo/scripts/bench.py" --json "$venv/last-run.json" "$@"
