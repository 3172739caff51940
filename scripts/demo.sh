#!/usr/bin/env bash
# The main job: a real demo batch of untrusted files under hard limits (see scripts/demo.py).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/bootstrap.sh")
cd "$repo"
exec "$py" scripts/demo.py "$@"
