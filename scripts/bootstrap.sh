#!/usr/bin/env bash
# Create (or refresh) the project's venv in .venv and install sandboxrun with its dev tools.
# Sourced by scripts/test.sh and scripts/demo.sh; prints the venv's python path on stdout.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "sandboxrun needs Python >= 3.10 ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
  else
    echo "python venv/ensurepip missing: install python3-venv" >&2
    exit 1
  fi
fi
stamp="$venv/.installed-$(sha1sum "$repo/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log=$(mktemp)
  if ! { "$python" -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip \
         && "$venv/bin/python" -m pip install -q -e "$repo[dev]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: installing sandboxrun into $venv failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
echo "$venv/bin/python"
