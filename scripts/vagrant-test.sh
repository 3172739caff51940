#!/usr/bin/env bash
# Inside the Vagrant guest (see Vagrantfile): run the suite as a transient service with a
# delegated cgroup, the way a production runner would be started, so auto picks cgroup_v2.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root: sudo $0" >&2; exit 1; }
unit="sandboxrun-test-$$"
systemd-run --unit "$unit" --pipe --wait --collect --quiet \
  -p Delegate=yes -p WorkingDirectory=/vagrant \
  -E SANDBOXRUN_EXPECT_BACKEND=cgroup_v2 -E SANDBOXRUN_SKIP_VM=1 \
  /opt/sandboxrun/bin/python -m pytest -p no:cacheprovider -q tests "$@"
