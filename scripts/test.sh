#!/usr/bin/env bash
# The test command: lint, types (mypy --strict), the suite on this machine's backends, then the suite in a systemd +
# cgroup v2 guest when this host can run qemu (skip it with SANDBOXRUN_SKIP_VM=1).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
py=$(bash scripts/bootstrap.sh)

"$py" -m ruff check sandboxrun tests scripts
"$py" -m mypy --strict sandboxrun
# Windows and macOS are checked here, on Linux, not on those systems (docs/backends.md).
"$py" -m mypy --strict --platform win32 sandboxrun
"$py" -m mypy --strict --platform darwin sandboxrun
"$py" -c 'import json, sandboxrun; print(json.dumps(sandboxrun.detect(), indent=1))'
status=0
"$py" -m pytest -p no:cacheprovider "$@" tests || status=$?
# The portable pass: the transport, backend and start method Windows uses, on this machine.
SANDBOXRUN_TRANSPORT=portable SANDBOXRUN_TEST_BACKEND=psutil \
  "$py" -m pytest -p no:cacheprovider -m "not kernel" "$@" tests || status=$?
# The zygote's pure-Python PID 1 and the ctypes syscalls (where sandboxrun._native cannot be
# built): the tests of what PID 1 and the default profile do -- verdicts, tree kill,
# namespaces, supervision, idmapped hand-over, the filter -- once more through them (~1 min).
SANDBOXRUN_NATIVE=0 "$py" -m pytest -p no:cacheprovider "$@" tests/test_fault_matrix.py \
  tests/test_kernel.py tests/test_isolation.py tests/test_zygote_supervision.py \
  tests/test_default_profile.py || status=$?

if [ "${SANDBOXRUN_SKIP_VM:-0}" != 1 ] && [ -x scripts/vm-test.sh ]; then
  if [ "$(id -u)" = 0 ] && { [ -e /dev/kvm ] || command -v apt-get >/dev/null; }; then
    bash scripts/vm-test.sh || status=$?
  else
    echo "vm-test: skipped (needs root and qemu; set SANDBOXRUN_SKIP_VM=1 to silence)"
  fi
fi
exit $status
