from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandboxrun import detect

#: Wall-clock limits in tests are multiplied by this (the TCG guest is 20-35x slower).
SCALE = float(os.environ.get("SANDBOXRUN_TIME_SCALE", "1"))

REPORT = detect()
AVAILABLE = [name for name, entry in REPORT["backends"].items() if entry["available"]]
#: SANDBOXRUN_TEST_BACKEND=psutil restricts the parametrized tests to one backend (the portable
#: pass of scripts/test.sh: what Windows and macOS run).
if os.environ.get("SANDBOXRUN_TEST_BACKEND"):
    AVAILABLE = [name for name in AVAILABLE if name == os.environ["SANDBOXRUN_TEST_BACKEND"]]
KERNEL_BACKENDS = [name for name in AVAILABLE if name != "psutil"]


# The suite runs what users get: the default isolation profile (managers that do not choose).
# Tests about another profile choose it; SANDBOXRUN_ISOLATION set by the caller still wins.


def pytest_configure(config: pytest.Config) -> None:
    """Under the default isolation a task's /tmp is private (a fresh tmpfs), as with systemd's
    PrivateTmp=: folders handed to tasks must live elsewhere or be declared. So the tests'
    tmp_path (and TMPDIR, for tempfile and the bench's subprocesses) live in the checkout -- or,
    where it is read-only (the qemu guest mounts it so) or itself under /tmp (a clone there:
    a task sees it read-only), in a folder of the machine's."""
    if config.option.basetemp is None and sys.platform.startswith("linux"):
        runs = _writable_runs_folder()
        for old in runs.glob("run-*"):  # earlier runs' (multiprocessing cleans its own at exit)
            if not psutil.pid_exists(int(old.name[4:])):
                shutil.rmtree(old, ignore_errors=True)
        base = runs / f"run-{os.getpid()}"
        base.mkdir(parents=True, exist_ok=True)
        config.option.basetemp = str(base)
        os.environ["TMPDIR"] = str(base)
        tempfile.tempdir = None  # recomputed from TMPDIR


def under_private_tmp(path: Path) -> bool:
    """Below /tmp or /var/tmp, which the default isolation gives each task afresh."""
    return os.path.realpath(path).startswith(("/tmp/", "/var/tmp/"))


def _writable_runs_folder() -> Path:
    candidates = [Path(__file__).resolve().parents[1] / ".pytest-tmp"]
    if under_private_tmp(candidates[0]):
        candidates = []
    if os.geteuid() == 0:  # outside /root (0700: hidden from a task's other uid under strict)
        candidates.append(Path("/var/lib/sandboxrun-tests"))
    candidates.append(Path.home() / ".cache" / "sandboxrun-tests")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError:
            continue
        return folder
    raise RuntimeError(f"no writable folder for the tests' tmp_path among {candidates}")


def pytest_report_header(config: pytest.Config) -> str:
    return f"sandboxrun: auto picks {REPORT['chosen']}; available: {', '.join(AVAILABLE)}"


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal keys (``sandboxrun batch``) go to the test's own folder, not the user's home."""
    monkeypatch.setenv("SANDBOXRUN_STATE_DIR", str(tmp_path / "sandboxrun-state"))


@pytest.fixture(params=AVAILABLE)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=KERNEL_BACKENDS or [pytest.param("none", marks=pytest.mark.skip)])
def kernel_backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds * SCALE
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.01)
    return gone(pid)


def leftover_cgroups() -> list[str]:
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        for name in dirs:
            if name.startswith(f"sandboxrun-{os.getpid()}-"):
                found.append(os.path.join(root, name))
        if root.count(os.sep) > 8:
            dirs.clear()
    return found


def wait_until(condition: Callable[[], object], seconds: float, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it is true or ``seconds`` (times SCALE) have passed; its last
    value. For waits on a real condition instead of a fixed sleep before a negative assert."""
    deadline = time.monotonic() + seconds * SCALE
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval)
    return True


def new_descendants(before: set[int]) -> list[int]:
    """Live (not zombie) descendants of this process whose pid is not in ``before``, but the
    idle zygotes of the pool (shared by every manager of the process, they outlive one)."""
    pooled: set[int] = set()
    if sys.platform.startswith("linux"):
        from sandboxrun._zygote.client import POOL

        pooled = {zygote.pid for idle in POOL._idle.values() for zygote in idle}
    found = []
    for child in psutil.Process().children(recursive=True):
        if child.pid not in before and child.pid not in pooled and not gone(child.pid):
            found.append(child.pid)
    return found


def descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def cgroup_dirs(pid: int | str = "self") -> dict[str, Path]:
    """{hierarchy: directory} of a process's cgroups, found through /proc/self/mountinfo.

    The hierarchy is the controller list of a cgroup v1 mount (``"memory"``, ``"cpu,cpuacct"``,
    ``"name=systemd"``) or ``""`` for cgroup2; a cgroup outside a mount's root is left out.
    """
    paths: dict[frozenset[str], str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths[frozenset(controllers.split(",")) - {""}] = path
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, options = right.split()[:3]
        root, point = left.split()[3:5]
        if fstype == "cgroup2":
            names: frozenset[str] = frozenset()
        elif fstype == "cgroup":
            names = frozenset(options.split(",")) & {name for key in paths for name in key}
        else:
            continue
        if names not in paths:
            continue
        relative = os.path.relpath(paths[names], root)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            continue
        found.setdefault(",".join(sorted(names)), Path(point) / relative)
    return found


def syscall_implementations() -> list[object]:
    """``sandboxrun._syscalls``' two twins as pytest params: ctypes, and the compiled one (its
    param skipped where it was not built). Linux only."""
    from sandboxrun import _ctypes_syscalls

    found: list[object] = [pytest.param(_ctypes_syscalls, id="ctypes")]
    try:
        from sandboxrun import _native
    except ImportError:
        found.append(pytest.param(None, id="native", marks=pytest.mark.skip("not built here")))
    else:
        found.append(pytest.param(_native, id="native"))
    return found
