#!/usr/bin/env bash
# vm-test.sh - run the test suite inside a Debian 12 guest with systemd as PID 1 and pure
# cgroup v2, where the cgroup_v2 backend must be the one chosen. Hosts without that (hybrid
# cgroups, no systemd) use this to test the v2 code paths for real.
#
# Usage: scripts/vm-test.sh [PYTEST ARGS...]      e.g. scripts/vm-test.sh -k timeout -x
#   Exits with pytest's status (124: the VM timed out, 125: the VM failed). Needs root.
#
# It uses the guest recipe in ../shared/vm (override: SANDBOXRUN_SHARED_VM=DIR): installs the
# host tools if missing, builds and caches the image, boots it under qemu (KVM if the host CPU
# has vmx/svm, else TCG emulation, 20-35x slower), shares this checkout read-only at /mnt/host.
#
# The guest has python3, pytest, psutil and pystemd from Debian, no network, and neither typer
# nor pytest-timeout: their wheels are downloaded here (cached in $SANDBOXRUN_VM_DIR, default
# /tmp/sandboxrun-vm) and handed in through .vm-wheels/ (gitignored). The project is imported
# from the share through PYTHONPATH; nothing is built or written into the checkout.
#
# Env: SANDBOXRUN_TIME_SCALE  factor for the tests' wall-clock limits (default 20 under TCG,
#                             3 under KVM)
#      SANDBOXRUN_VM_TIMEOUT  seconds before the VM is killed (default 3600)
#      SANDBOXRUN_VM_TEST_TIMEOUT  pytest-timeout per test in the guest (default 900)
#      SANDBOXRUN_VM_ARGS     extra options for run-in-vm.sh (e.g. "-m 4096 -c 4 -v")
set -euo pipefail

started=$SECONDS
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vm="${SANDBOXRUN_SHARED_VM:-$repo/../shared/vm}"
die() { echo "vm-test.sh: $*" >&2; exit 125; }
[ -x "$vm/run-in-vm.sh" ] || die "no guest recipe at $vm (set SANDBOXRUN_SHARED_VM)"
vm="$(cd "$vm" && pwd)"
[ "$(id -u)" = 0 ] || die "needs root (qemu 9p passthrough, image build): sudo $0 $*"

"$vm/install-host-deps.sh" >&2 || die "cannot install the host tools"
"$vm/build-image.sh" >&2 || die "image build failed"

# --- wheels the guest lacks (pure Python but pydantic-core: take the guest's platform) -------
cache="${SANDBOXRUN_VM_DIR:-/tmp/sandboxrun-vm}/wheels-cp311"
if [ ! -f "$cache/.complete" ]; then
  pip=(python3 -m pip)
  [ -x "$repo/.venv/bin/python" ] && pip=("$repo/.venv/bin/python" -m pip)
  rm -rf "$cache" && mkdir -p "$cache"
  # Guest: Debian 12, CPython 3.11, glibc 2.36. Its own pytest stays (no deps for the plugin).
  target=(--only-binary=:all: --python-version 3.11 --implementation cp
          --platform manylinux_2_36_x86_64 --platform any -d "$cache")
  "${pip[@]}" download -qq --disable-pip-version-check "${target[@]}" typer >&2 \
    && "${pip[@]}" download -qq --disable-pip-version-check "${target[@]}" --no-deps \
         'pytest-timeout>=2.1' >&2 \
    || die "pip download of the guest's wheels failed"
  touch "$cache/.complete"
fi
rm -rf "$repo/.vm-wheels" && mkdir -p "$repo/.vm-wheels"
trap 'rm -rf "$repo/.vm-wheels"' EXIT
cp "$cache"/*.whl "$repo/.vm-wheels/"

# --- time scale: TCG (no vmx/svm) is 20-35x slower than native, KVM a little ----------------
if [ -z "${SANDBOXRUN_TIME_SCALE:-}" ]; then
  if [ -c /dev/kvm ] && [ -w /dev/kvm ] && grep -qw -E 'vmx|svm' /proc/cpuinfo; then
    SANDBOXRUN_TIME_SCALE=3
  else
    SANDBOXRUN_TIME_SCALE=20
  fi
fi

# --- the guest side ----------------------------------------------------------------------------
pytest_args=(-p no:cacheprovider -q --timeout="${SANDBOXRUN_VM_TEST_TIMEOUT:-900}" tests "$@")
guest_script=$(cat <<'GUEST'
set -u
[ -n "${SANDBOXRUN_VM_CGROUP:-}" ] || { echo "vm-test.sh: guest has no delegated cgroup" >&2; exit 125; }
t0=$(date +%s.%N)
# Unpacking a wheel is all pip would do for these (no scripts or data needed), at a fraction
# of pip's start-up time under emulation.
python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' \
  /mnt/host/.vm-wheels/*.whl || exit 125
mkdir -p /tmp/bin
printf '#!/usr/bin/python3\nfrom sandboxrun.cli import app\napp()\n' > /tmp/bin/sandboxrun
chmod +x /tmp/bin/sandboxrun
export PATH="/tmp/bin:$PATH" PYTHONPATH=/mnt/host:/tmp/site PYTHONDONTWRITEBYTECODE=1
export SANDBOXRUN_CGROUP_ROOT="$SANDBOXRUN_VM_CGROUP" SANDBOXRUN_EXPECT_BACKEND=cgroup_v2
echo "vm-test.sh: guest kernel $(uname -r), $(python3 -V), cgroup root $SANDBOXRUN_CGROUP_ROOT," \
  "time scale $SANDBOXRUN_TIME_SCALE, wheels unpacked in" \
  "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
GUEST
)
guest_script+=$'\n'"exec python3 -m pytest$(printf ' %q' "${pytest_args[@]}")"

read -r -a vm_args <<<"${SANDBOXRUN_VM_ARGS:-}"
set +e
"$vm/run-in-vm.sh" --ro -s "$repo" -t "${SANDBOXRUN_VM_TIMEOUT:-3600}" "${vm_args[@]}" \
  -e SANDBOXRUN_TIME_SCALE="$SANDBOXRUN_TIME_SCALE" -- "$guest_script"
status=$?
set -e
echo "vm-test.sh: exit $status after $((SECONDS - started))s (host setup, boot and tests)" >&2
exit "$status"
