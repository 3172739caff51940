#!/usr/bin/env bash
# The main job: a real demo batch. Writes 13 sample files (8 ordinary, 4 hostile, one named
# `--help.txt`) and a symlink to /etc/hostname, converts them with `sandboxrun batch` under a
# 256 MiB / 5 s / 64-process limit per file, then checks that each file got the verdict it should
# and that the symlink was skipped.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/bootstrap.sh")
work=${1:-"$repo/demo-output"}
rm -rf "$work"
# The journal's key goes with the demo's output, not into ~/.local/state.
export SANDBOXRUN_STATE_DIR=${SANDBOXRUN_STATE_DIR:-"$work/state"}
"$py" "$repo/scripts/demo.py" samples "$work/input"
status=0
"$(dirname "$py")/sandboxrun" batch "$work/input" --out "$work/output" \
  --cmd "$py $repo/scripts/demo.py convert {input} {output}.z" \
  --memory 256M --timeout 5s --max-processes 64 --cpu-time 10s || status=$?
# batch exits 1 here by design (the hostile files fail); anything else is a real error.
[ "$status" -le 1 ] || exit "$status"
"$py" "$repo/scripts/demo.py" check "$work/output/sandboxrun-journal.jsonl"
