#!/usr/bin/env bash
# vm-test.sh - run the test suite inside a Debian 12 guest with systemd as PID 1 and pure
# cgroup v2. Hosts without that (hybrid cgroups, no systemd) use this to test the cgroup v2 and
# systemd code paths for real. One boot, up to four steps, each reported on its own:
#
#   1. delegated   the suite (but the systemd backend) in a cgroup delegated to the run
#                  ($SANDBOXRUN_CGROUP_ROOT): `auto` must pick cgroup_v2
#   2. timing      ms per task of cgroup_v2, systemd (both scope modes) and psutil
#   3. no-delegate the fault matrix, the kernel tests and test_systemd.py as root in a plain
#                  transient service without Delegate=: `auto` must pick systemd; then the
#                  fault matrix again with one scope per task (scope_mode=task)
#   4. user        the same as an unprivileged user, in a service of that user's own manager,
#                  then test_systemd.py from a cgroup the user does not own (like a login
#                  session); skipped, with the reason, when the guest cannot run a user manager
#
# Usage: scripts/vm-test.sh [PYTEST ARGS...]      e.g. scripts/vm-test.sh -k timeout -x
#   PYTEST ARGS are added to every pytest run (a -k of yours replaces the step's own).
#   Exits 0 when every step passed, 1 when one failed (124: the VM timed out, 125: the VM
#   failed). Needs root.
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
#      SANDBOXRUN_VM_STEPS    which steps to run (default "delegated timing nodelegate user")
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
extra=""
[ $# = 0 ] || extra="$(printf ' %q' "$@")"
guest_script="$(printf 'extra=(%s)\nsteps=%q\ntest_timeout=%q\n' "$extra" \
  "${SANDBOXRUN_VM_STEPS:-delegated timing nodelegate user}" "${SANDBOXRUN_VM_TEST_TIMEOUT:-900}")"
guest_script+=$'\n'$(cat <<'GUEST'
set -u
[ -n "${SANDBOXRUN_VM_CGROUP:-}" ] || { echo "vm-test.sh: guest has no delegated cgroup" >&2; exit 125; }
t0=$(date +%s.%N)
# Unpacking a wheel is all pip would do for these (no scripts or data needed), at a fraction
# of pip's start-up time under emulation.
python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' \
  /mnt/host/.vm-wheels/*.whl || exit 125
chmod -R a+rX /tmp/site
mkdir -p /tmp/bin
printf '#!/usr/bin/python3\nfrom sandboxrun.cli import app\napp()\n' > /tmp/bin/sandboxrun
chmod 755 /tmp/bin/sandboxrun
export PATH="/tmp/bin:$PATH" PYTHONPATH=/mnt/host:/tmp/site PYTHONDONTWRITEBYTECODE=1
echo "vm-test.sh: guest kernel $(uname -r), $(python3 -V), $(systemctl --version | head -n1)," \
  "time scale $SANDBOXRUN_TIME_SCALE, wheels unpacked in" \
  "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"

pytest=(python3 -m pytest -p no:cacheprovider -q -ra --timeout="$test_timeout")
systemd_only=(tests/test_fault_matrix.py tests/test_kernel.py tests/test_systemd.py tests/test_isolation.py
              -k "systemd or auto_picks or no_cgroup_left")
summary=() status=0
step() {  # step NAME COMMAND...: run it, remember how it ended
  local name=$1 started=$SECONDS rc; shift
  echo; echo "=== vm-test.sh: $name ==="
  "$@"; rc=$?
  summary+=("$(printf '%-34s exit %3s  %4ss' "$name" "$rc" "$((SECONDS - started))")")
  [ "$rc" = 0 ] || status=1
}
wanted() { [[ " $steps " == *" $1 "* ]]; }
no_delegate() {  # a plain transient service: no Delegate=, nothing set up for us
  systemd-run --quiet --unit "sandboxrun-nodelegate-$1" --pipe --wait --collect \
    -p WorkingDirectory=/mnt/host -E PATH="$PATH" -E PYTHONPATH="$PYTHONPATH" \
    -E PYTHONDONTWRITEBYTECODE=1 -E SANDBOXRUN_TIME_SCALE="$SANDBOXRUN_TIME_SCALE" \
    -E SANDBOXRUN_EXPECT_BACKEND=systemd -E HOME=/root -E LANG=C.UTF-8 "${@:2}"
}

if wanted delegated; then
  step "1 delegated (cgroup_v2)" env SANDBOXRUN_CGROUP_ROOT="$SANDBOXRUN_VM_CGROUP" \
    SANDBOXRUN_EXPECT_BACKEND=cgroup_v2 "${pytest[@]}" tests -k "not systemd" "${extra[@]}"
fi

if wanted timing; then
  step "2 timing (ms per task)" env SANDBOXRUN_CGROUP_ROOT="$SANDBOXRUN_VM_CGROUP" python3 - <<'PY'
import time

from sandboxrun import ProcessManager, Task
from sandboxrun._backends.systemd import SystemdBackend
from tests import tasks

N, LIMITS = 30, {"worker_timeout_seconds": 600, "memory_limit_in_gib": 0.5, "max_processes": 64}
for label, make in [
    ("cgroup_v2", lambda: "cgroup_v2"),
    ("systemd scope_mode=runner", lambda: SystemdBackend(scope_mode="runner")),
    ("systemd scope_mode=task", lambda: SystemdBackend(scope_mode="task")),
    ("psutil", lambda: "psutil"),
]:
    with ProcessManager(1, backend=make(), **LIMITS) as pm:  # warm-up
        pm.queue_task(Task(tasks.double, (1,)))
    pm = ProcessManager(1, backend=make(), **LIMITS)
    started = time.perf_counter()
    pm.backend.open()
    pm._backend_open = True  # opened here, so its cost is measured apart
    opened = time.perf_counter()
    with pm:
        for index in range(N):
            pm.queue_task(Task(tasks.double, (index,)))
        for _ in pm.as_completed():
            pass
        ran = time.perf_counter()
    closed = time.perf_counter()
    assert all(r.success for r in pm.task_results), pm.task_results
    print(f"timing {label:<26} {(ran - opened) / N * 1000:5.0f} ms/task ({N} tasks, one at "
          f"a time); open {(opened - started) * 1000:.0f} ms, close {(closed - ran) * 1000:.0f} ms")
PY
fi

if wanted nodelegate; then
  step "3a no-delegate root (systemd)" no_delegate root "${pytest[@]}" "${systemd_only[@]}" \
    "${extra[@]}"
  # The fault matrix once more with one transient scope per task (the layout checks of
  # test_kernel.py are about the runner cgroup, which that mode does not have).
  step "3b same, scope_mode=task" no_delegate task -E SANDBOXRUN_SYSTEMD_SCOPE_MODE=task \
    "${pytest[@]}" tests/test_fault_matrix.py -k systemd "${extra[@]}"
fi

if wanted user; then
  uid=1500 user=sandboxrun-test
  # The image has no pam_systemd, which would give user@.service its XDG_RUNTIME_DIR.
  mkdir -p /run/systemd/system/user@.service.d
  printf '[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%%i\n' \
    > /run/systemd/system/user@.service.d/sandboxrun-vm.conf
  why=""
  { systemctl daemon-reload && useradd -m -u "$uid" "$user" && loginctl enable-linger "$user" \
      && systemctl start "user@$uid.service"; } >/dev/null 2>&1 \
    || why="cannot start user@$uid.service: $(journalctl -b -q -n 3 -u "user@$uid.service" | tr '\n' ' ')"
  [ -n "$why" ] || [ -S "/run/user/$uid/systemd/private" ] || why="user@$uid.service has no private socket"
  if [ -n "$why" ]; then
    echo; echo "=== vm-test.sh: 4 user: skipped: $why ==="; summary+=("4 user: skipped ($why)")
  else
    as_user=(runuser -u "$user" -- env XDG_RUNTIME_DIR="/run/user/$uid" HOME="/home/$user"
             PATH="$PATH" PYTHONPATH="$PYTHONPATH" PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
             SANDBOXRUN_TIME_SCALE="$SANDBOXRUN_TIME_SCALE")
    # a) in a plain service of the user's own manager (no Delegate=), so it may move back at
    #    close. No user bus in the image: systemd-run --user works only without --wait/--pipe
    #    (then it uses the manager's private socket), so wait for the exit status in a file.
    user_service() {
      local log=/tmp/sandboxrun-user.log rc=/tmp/sandboxrun-user.rc deadline=$((SECONDS + 3000))
      install -m 644 -o "$user" /dev/null "$log" && rm -f "$rc" || return 125
      printf '#!/bin/sh\n"$@"\necho $? > %s\n' "$rc" > /tmp/sandboxrun-user.sh
      chmod 755 /tmp/sandboxrun-user.sh
      "${as_user[@]}" systemd-run --user --quiet --unit sandboxrun-nodelegate-user --collect \
        -p WorkingDirectory=/mnt/host -p StandardOutput="append:$log" -p StandardError=inherit \
        -E PATH="$PATH" -E PYTHONPATH="$PYTHONPATH" -E PYTHONDONTWRITEBYTECODE=1 \
        -E SANDBOXRUN_TIME_SCALE="$SANDBOXRUN_TIME_SCALE" -E SANDBOXRUN_EXPECT_BACKEND=systemd \
        -E LANG=C.UTF-8 /tmp/sandboxrun-user.sh "$@" || return 125
      tail -n +1 -f "$log" & local tailer=$!
      while [ ! -s "$rc" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 2; done
      sleep 1; kill "$tailer"; wait "$tailer" 2>/dev/null
      [ -s "$rc" ] && return "$(cat "$rc")"
      echo "vm-test.sh: the user service did not finish"; return 124
    }
    step "4a user, user service (systemd)" user_service "${pytest[@]}" "${systemd_only[@]}" \
      "${extra[@]}"
    # b) from a cgroup the user does not own (root's, as a login session's would be)
    step "4b user, foreign cgroup (systemd)" "${as_user[@]}" "${pytest[@]}" tests/test_systemd.py \
      "${extra[@]}"
  fi
fi

echo; echo "=== vm-test.sh: summary ==="
printf '  %s\n' "${summary[@]}"
exit "$status"
GUEST
)

read -r -a vm_args <<<"${SANDBOXRUN_VM_ARGS:-}"
set +e
"$vm/run-in-vm.sh" --ro -s "$repo" -t "${SANDBOXRUN_VM_TIMEOUT:-3600}" "${vm_args[@]}" \
  -e SANDBOXRUN_TIME_SCALE="$SANDBOXRUN_TIME_SCALE" -- "$guest_script"
status=$?
set -e
echo "vm-test.sh: exit $status after $((SECONDS - started))s (host setup, boot and tests)" >&2
exit "$status"
