#!/usr/bin/env bash
# Create (or refresh) the project's venv in .venv and install sandboxrun with its dev tools, the
# [dask] extra (so the Dask tests run rather than skip), and on a systemd host the [systemd] extra
# (pystemd builds from source: libsystemd-dev, pkg-config and gcc come from apt when missing). Prints the venv's python path on stdout, all else on stderr.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
python=${PYTHON:-python3}

apt_install() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >&2
  else
    echo "bootstrap: please install: $*" >&2
    return 1
  fi
}

if ! "$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "sandboxrun needs Python >= 3.10 ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
"$python" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

extras=dev,dask
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  extras=dev,dask,systemd
  if ! pkg-config --exists libsystemd 2>/dev/null || ! command -v gcc >/dev/null; then
    apt_install libsystemd-dev pkg-config gcc || extras=dev,dask
  fi
fi

# setup.py and the C source too: the compiled PID 1 (sandboxrun/_native.c) is built in place by
# the editable install, and a stale one would keep running after the source changed.
stamp="$venv/.installed-$(cat "$repo/pyproject.toml" "$repo/setup.py" "$repo/sandboxrun/_native.c" \
  | sha1sum | cut -c1-12)-$extras"
if [ ! -f "$stamp" ]; then
  log=$(mktemp)
  if ! { "$python" -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip \
         && "$venv/bin/python" -m pip install -q -e "$repo[$extras]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: installing sandboxrun into $venv failed (log above)" >&2
    exit 1
  fi
  rm -f "$log" "$venv"/.installed-*
  touch "$stamp"
fi
echo "$venv/bin/python"
