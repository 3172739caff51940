"""Issue 12: each attack of a compromised task, run first with ``isolation="none"`` (where it
must reach its aim, or the test proves nothing) and then under the profile that must stop it.

The step functions run in ``tests/isolated.py``'s stand-in launcher (the real order: PID 1
sets up namespaces and mounts, PID 2 drops privileges and runs the attack). Attacks through a
``ProcessManager`` are at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandboxrun import _transport as transport
from sandboxrun._isolation import DEFAULT, NONE, STRICT, build_environment, probe, resolve
from sandboxrun._isolation.profile import DEFAULT_UID_BASE, Isolation

from . import isolated
from .conftest import _writable_runs_folder, under_private_tmp
from .isolated import run_isolated

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.geteuid() != 0
    or probe().get("fresh_proc") is not True,
    reason="the isolation steps need Linux, root here, and namespaces that work",
)


# --- attacks (module level: a zygote receives them pickled) --------------------------------


def write_sysctl() -> str:
    path = Path("/proc/sys/vm/swappiness")
    path.write_text(path.read_text())  # the same value: harmless when it succeeds
    return "written"


def append_to(path: str) -> str:
    with open(path, "a") as file:
        file.write("planted\n")
    return "written"


def create_file(path: str) -> str:
    Path(path).write_text("planted")
    return "written"


def leave_files(name: str) -> str:
    for folder in ("/tmp", "/dev/shm"):
        Path(folder, name).write_bytes(b"x" * 4096)
    return "written"


def connect_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(path)
    return "connected"


def connect_tcp(port: int) -> str:
    with socket.socket() as sock:  # no create_connection: its idna import is not the point
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        return "connected"


def signal_pid(pid: int, signum: int) -> str:
    os.kill(pid, signum)
    return "sent"


def read_proc(pid: int) -> str:
    with open(f"/proc/{pid}/mem", "rb"):
        pass
    return "opened /proc/pid/mem: " + ",".join(os.listdir(f"/proc/{pid}/fd"))


def write_file(path: str, text: str) -> str:
    Path(path).write_text(text)
    return "written"


def credentials() -> dict[str, str]:
    from sandboxrun._isolation._privileges import status

    return status()


def clone3_into(cgroup_dir: str) -> str:
    """clone3(CLONE_INTO_CGROUP) a child into ``cgroup_dir``; the child reports where it is."""

    class CloneArgs(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
            "tls", "set_tid", "set_tid_size", "cgroup")]  # fmt: skip

    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    read_fd, write_fd = os.pipe()
    args = CloneArgs(flags=0x200000000, exit_signal=signal.SIGCHLD, cgroup=fd)
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.syscall(435, ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        os.write(write_fd, Path("/proc/self/cgroup").read_bytes())
        os._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    os.close(write_fd)
    os.waitpid(pid, 0)
    return os.read(read_fd, 4096).decode()


def _cgroup2_point() -> str:
    from sandboxrun._isolation._cgroupns import cgroup2_mount_points

    return cgroup2_mount_points()[0]


def read_cgroup_view() -> tuple[str, list[str]]:
    """What the task sees of cgroup v2: its /proc/self/cgroup line and the sub-cgroups of the
    cgroup2 mount's root."""
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x[:3] == "0::")
    root = Path(_cgroup2_point())
    return line, sorted(p.name for p in root.iterdir() if p.is_dir())


def make_sub_cgroup() -> str:
    Path(_cgroup2_point(), "escape").mkdir()
    return "made"


# --- fixtures --------------------------------------------------------------------------------


#: A profile is given by the zygote only (the portable pass runs spawn).
NEEDS_ZYGOTE = pytest.mark.skipif(
    not transport.EXIT_BY_PIDFD, reason="isolation needs the zygote start method"
)

#: The default profile with a private /tmp (strict's): the tests of that machinery. Under the
#: default profile itself /tmp is the host's (docs/security.md, "The rule of the default
#: profile"); ``ROOT_PRIVATE_TMP`` also keeps the manager's uid, as the launcher stand-in hands
#: no path idmapped (tests/test_default_profile.py covers that through a real manager).
PRIVATE_TMP = dataclasses.replace(DEFAULT, name="custom", private_tmp=True)
ROOT_PRIVATE_TMP = dataclasses.replace(PRIVATE_TMP, user=None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that runs an attack through ``run_isolated`` runs it twice: PID 1 entering a
    prepared view (the zygote's way) and building its whole view itself (fork, non-root)."""
    if "view" in metafunc.fixturenames and "run_isolated" in inspect.getsource(metafunc.function):
        metafunc.parametrize("view", ["prepared view", "per task"], indirect=True)


@pytest.fixture(autouse=True)
def view(request: pytest.FixtureRequest) -> str:
    mode: str = getattr(request, "param", "prepared view")
    isolated.PREPARED_VIEW = mode == "prepared view"
    if not isolated.PREPARED_VIEW:
        _forget_views()
    return mode


def _forget_views() -> None:
    from sandboxrun._isolation import _mounts, _view

    if _view._views is not None:
        _view._views.close()
        _view._views = None
    _mounts._KEPT.clear()


@pytest.fixture
def scratch(request: pytest.FixtureRequest) -> list[Path]:
    """Paths the test creates in host places; removed whatever happened."""
    paths: list[Path] = []
    yield paths  # type: ignore[misc]
    for path in paths:
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def _refused(outcome: tuple[str, object]) -> bool:
    return outcome[0] == "raised"


# --- kernel tunables, system files, sandboxrun's code ---------------------------------------


def test_sysctl_write() -> None:
    assert run_isolated(NONE, write_sysctl) == ("ok", "written")
    for profile in (DEFAULT, STRICT):
        outcome = run_isolated(profile, write_sysctl)
        assert _refused(outcome) and "Read-only file system" in outcome[1], outcome


def test_usr_local_share(scratch: list[Path]) -> None:
    target = Path("/usr/local/share") / f"sandboxrun-test-{uuid.uuid4().hex}"
    target.write_text("original\n")
    scratch.append(target)
    assert run_isolated(NONE, append_to, str(target)) == ("ok", "written")
    target.write_text("original\n")
    for profile in (DEFAULT, STRICT):
        assert _refused(run_isolated(profile, append_to, str(target)))
    assert target.read_text() == "original\n"


def write_here(name: str) -> str:
    Path(name).write_text("planted")  # relative: through the working directory
    return "written"


def test_usr_through_the_working_directory(scratch: list[Path]) -> None:
    folder = Path("/usr/local/share", f"sandboxrun-cwd-{uuid.uuid4().hex[:12]}")
    folder.mkdir(parents=True)
    scratch += [folder / "planted", folder]
    here = os.getcwd()
    os.chdir(folder)  # inherited by the task, as the manager's cwd is
    try:
        assert run_isolated(NONE, write_here, "planted") == ("ok", "written")
        (folder / "planted").unlink()
        assert _refused(run_isolated(DEFAULT, write_here, "planted"))
        assert not (folder / "planted").exists()
    finally:
        os.chdir(here)


def read_here(name: str) -> str:
    return Path(name).read_text()


@pytest.mark.parametrize("where", ["below", "itself"])
def test_host_tmp_through_the_working_directory(where: str, scratch: list[Path]) -> None:
    folder = Path("/tmp", f"sandboxrun-cwd-{uuid.uuid4().hex[:12]}")
    folder.mkdir()
    (folder / "input").write_text("readable")
    scratch += [folder / "planted", folder / "input", folder]
    start = folder if where == "below" else Path("/tmp")
    here = os.getcwd()
    os.chdir(start)
    try:
        assert run_isolated(NONE, write_here, "planted") == ("ok", "written")
        (start / "planted").unlink()
        outcome = run_isolated(PRIVATE_TMP, write_here, "planted")
        assert not (start / "planted").exists(), outcome  # nothing left in the host's /tmp
        if where == "below":  # kept visible read-only, as what a task runs from /tmp is
            assert _refused(outcome), outcome
            assert run_isolated(PRIVATE_TMP, read_here, "input") == ("ok", "readable")
        else:  # the private /tmp: written there, gone with the task
            assert outcome == ("ok", "written"), outcome
    finally:
        os.chdir(here)


def test_sandboxrun_code(scratch: list[Path]) -> None:
    import sandboxrun

    package = Path(sandboxrun.__file__).parent
    if not os.access(package, os.W_OK):
        pytest.skip(f"{package} is read-only here (the guest mounts the checkout so)")
    target = package / f"planted_{uuid.uuid4().hex}.py"
    scratch.append(target)
    assert run_isolated(NONE, create_file, str(target)) == ("ok", "written")
    target.unlink()
    for profile in (DEFAULT, STRICT):
        assert _refused(run_isolated(profile, create_file, str(target)))
        assert not target.exists()


def test_site_packages(scratch: list[Path]) -> None:
    import site

    target = Path(site.getsitepackages()[0]) / f"zz_planted_{uuid.uuid4().hex}.pth"
    scratch.append(target)
    assert _refused(run_isolated(DEFAULT, create_file, str(target)))
    assert not target.exists()


# --- leftovers ------------------------------------------------------------------------------


def test_files_left_in_tmp_and_dev_shm(scratch: list[Path]) -> None:
    name = f"sandboxrun-leftover-{uuid.uuid4().hex}"
    scratch += [Path("/tmp", name), Path("/dev/shm", name)]
    assert run_isolated(NONE, leave_files, name) == ("ok", "written")
    assert all(path.exists() for path in scratch)
    for path in scratch:
        path.unlink()
    assert run_isolated(PRIVATE_TMP, leave_files, name) == ("ok", "written")  # privately
    assert not any(path.exists() for path in scratch)
    # default: the host's /tmp (a file the task's uid owns, as any local user's), its own
    # /dev/shm (gone with it)
    assert run_isolated(DEFAULT, leave_files, name) == ("ok", "written")
    tmp, shm = scratch
    assert tmp.stat().st_uid == DEFAULT_UID_BASE and not shm.exists()


# --- sockets and network --------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["/run", "/tmp"])
def test_connect_to_host_unix_socket(folder: str, scratch: list[Path]) -> None:
    path = Path(folder, f"sandboxrun-test-{uuid.uuid4().hex[:12]}.sock")
    scratch.append(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        os.chmod(path, 0o777)
        server.listen(8)
        assert run_isolated(NONE, connect_unix, str(path)) == ("ok", "connected")
        for profile in (DEFAULT, STRICT, PRIVATE_TMP):
            outcome = run_isolated(profile, connect_unix, str(path))
            if profile is DEFAULT and folder == "/tmp":  # a 0777 socket in the host's /tmp:
                assert outcome == ("ok", "connected")  # any local user's (security.md, open)
                continue
            assert _refused(outcome) and "No such file" in outcome[1], outcome


def test_network_under_strict() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        assert run_isolated(NONE, connect_tcp, port) == ("ok", "connected")
        assert run_isolated(DEFAULT, connect_tcp, port) == ("ok", "connected")  # default: network
        outcome = run_isolated(STRICT, connect_tcp, port)
        assert _refused(outcome) and "refused" in outcome[1].lower(), outcome  # lo only, up


# --- other processes: signals, /proc/<pid>/mem and fd ---------------------------------------


@pytest.fixture
def victim() -> subprocess.Popen[bytes]:
    """A root process outside the task, standing for the manager or a neighbour task."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process  # type: ignore[misc]
    process.kill()
    process.wait()


@pytest.mark.parametrize("signum", [signal.SIGSTOP, signal.SIGKILL])
def test_signal_the_manager(victim: subprocess.Popen[bytes], signum: int) -> None:
    for profile in (DEFAULT, STRICT):
        outcome = run_isolated(profile, signal_pid, victim.pid, signum)
        assert _refused(outcome) and "No such process" in outcome[1], outcome
        assert victim.poll() is None
        assert Path(f"/proc/{victim.pid}/stat").read_text().split()[2] != "T"
    assert run_isolated(NONE, signal_pid, victim.pid, signum) == ("ok", "sent")
    if signum == signal.SIGKILL:
        assert victim.wait(5) == -signal.SIGKILL


def test_proc_mem_and_fd_of_the_manager(victim: subprocess.Popen[bytes]) -> None:
    assert run_isolated(NONE, read_proc, victim.pid)[0] == "ok"
    for profile in (DEFAULT, STRICT):
        outcome = run_isolated(profile, read_proc, victim.pid)
        assert _refused(outcome) and "No such file" in outcome[1], outcome


def test_neighbour_slots_cannot_signal_each_other(victim: subprocess.Popen[bytes]) -> None:
    """Under strict each slot has its own uid: even a pid it can see (here: no pid ns on the
    way, the victim is our own process) cannot be signalled across slots."""
    assert run_isolated(STRICT, credentials, slot=3)[1]["Uid"].split()[0] == str(
        DEFAULT_UID_BASE + 3
    )


# --- credentials ----------------------------------------------------------------------------


def test_no_way_back() -> None:
    outcome = run_isolated(DEFAULT, credentials)
    assert outcome[0] == "ok", outcome
    found = outcome[1]
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(found[key], 16) == 0, (key, found)
    assert found["NoNewPrivs"] == "1"
    strict = run_isolated(STRICT, credentials, slot=1)[1]
    assert strict["Uid"].split() == [str(DEFAULT_UID_BASE + 1)] * 4
    assert strict["Gid"].split() == [str(DEFAULT_UID_BASE + 1)] * 4


def test_rlimits() -> None:
    import resource

    def limits() -> list[tuple[int, int]]:
        return [resource.getrlimit(r) for r in (resource.RLIMIT_CORE, resource.RLIMIT_NOFILE,
                                                 resource.RLIMIT_FSIZE)]  # fmt: skip

    profile = Isolation(max_open_files=64, max_file_size=1 << 20)
    assert run_isolated(profile, limits) == ("ok", [(0, 0), (64, 64), (1 << 20, 1 << 20)])


# --- strict: the whole tree read-only but declared paths -------------------------------------


@pytest.mark.parametrize("where", ["/tmp", "checkout"])
def test_strict_read_write_paths(where: str, outside_tmp: Path) -> None:
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp")) if where == "/tmp" else outside_tmp
    try:
        folder.chmod(0o755)  # the slot uid must be able to reach its output folder...
        out, other = folder / "out", folder / "other"
        for directory in (out, other):
            directory.mkdir()
            directory.chmod(0o777)  # ... and to write there
        profile = STRICT.with_paths([str(out)])
        outcome = run_isolated(profile, write_file, str(out / "a.txt"), "result")
        assert outcome == ("ok", "written")
        assert (out / "a.txt").read_text() == "result"
        assert _refused(run_isolated(profile, write_file, str(other / "b.txt"), "x"))
        assert not (other / "b.txt").exists()
    finally:
        for directory in ("out", "other"):
            shutil.rmtree(folder / directory, ignore_errors=True)
        if where == "/tmp":
            shutil.rmtree(folder, ignore_errors=True)


@NEEDS_ZYGOTE
def test_default_keeps_the_output_folder(tmp_path: Path) -> None:
    """The seed's pattern: a function writing its output next to its input; the folder is
    handed to the task (idmapped) by the real launcher."""
    from sandboxrun import ProcessManager, Task

    with ProcessManager(1, 20, isolation="default") as pm:
        pm.queue_task(Task(write_file, (str(tmp_path / "o.txt"), "out")))
    assert pm.task_results[0].result == "written", pm.task_results[0]
    assert (tmp_path / "o.txt").read_text() == "out"


# --- cgroups: limits rewritten, escape to the parent ----------------------------------------


def _v1_memory_dir() -> Path | None:
    from sandboxrun._backends import cgroupfs

    own = cgroupfs.own_cgroups()
    for kind, point, options in cgroupfs.mounts():
        if kind == "cgroup" and "memory" in options and "memory" in own:
            return point / own["memory"].lstrip("/")
    return None


def _remove_cgroups(*directories: Path) -> None:
    """rmdir each, retrying while the kernel still counts a process that just exited."""
    for directory in directories:
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.02)


@pytest.fixture
def v1_task_cgroup() -> Path:
    parent = _v1_memory_dir()
    if parent is None:
        pytest.skip("no cgroup v1 memory hierarchy here")
    runner = parent / f"sandboxrun-isotest-{os.getpid()}"
    task = runner / "task-0"
    task.mkdir(parents=True)
    (task / "memory.limit_in_bytes").write_text(str(256 << 20))
    yield task  # type: ignore[misc]
    _remove_cgroups(task, runner)


def test_cgroup_limit_rewritten_and_escape(v1_task_cgroup: Path) -> None:
    limit = v1_task_cgroup / "memory.limit_in_bytes"
    procs = v1_task_cgroup.parent / "cgroup.procs"
    enter = [str(v1_task_cgroup / "cgroup.procs")]
    for profile in (DEFAULT, STRICT):
        outcome = run_isolated(profile, write_file, str(limit), "-1", enter=enter)
        assert _refused(outcome), outcome
        assert int(limit.read_text()) == 256 << 20
        outcome = run_isolated(profile, write_file, str(procs), "0", enter=enter)
        assert _refused(outcome), outcome
    assert run_isolated(NONE, write_file, str(limit), "-1", enter=enter) == ("ok", "written")
    assert int(limit.read_text()) > 256 << 20


@pytest.fixture
def v2_pair() -> tuple[Path, Path]:
    from sandboxrun._backends import cgroupfs

    own = cgroupfs.own_cgroups().get("")
    point = next((p for kind, p, _ in cgroupfs.mounts() if kind == "cgroup2"), None)
    if own is None or point is None:
        pytest.skip("no cgroup2 hierarchy here")
    runner = point / own.lstrip("/") / f"sandboxrun-isotest-{os.getpid()}"
    pair = runner / "a", runner / "b"
    try:
        for directory in pair:
            directory.mkdir(parents=True)
    except OSError as error:
        pytest.skip(f"cannot create cgroup2 directories here: {error}")
    yield pair  # type: ignore[misc]
    _remove_cgroups(*pair, runner)


def test_clone3_into_cgroup_v2(v2_pair: tuple[Path, Path]) -> None:
    """The measured hole: CLONE_INTO_CGROUP ignores a read-only cgroupfs, and a capless uid 0
    may write every cgroup.procs. The task's own cgroup namespace, with cgroup2 remounted to
    show only its cgroup, leaves it no other cgroup to name (default and strict); under strict
    its uid owns no cgroup file either. Runs on this host's empty cgroup2 (no nsdelegate)."""
    a, b = v2_pair
    enter = [str(a / "cgroup.procs")]
    assert "/b" in run_isolated(NONE, clone3_into, str(b), enter=enter)[1]
    for profile in (DEFAULT, STRICT):
        outcome = run_isolated(profile, clone3_into, str(b), enter=enter)
        assert _refused(outcome) and "No such file" in outcome[1], (profile.name, outcome)
        assert (b / "cgroup.procs").read_text() == ""
    # Through any path it can still name: only its own cgroup, and no sub-cgroup to make.
    assert run_isolated(DEFAULT, read_cgroup_view, enter=enter)[1] == ("0::/", [])
    outcome = run_isolated(DEFAULT, make_sub_cgroup, enter=enter)
    assert _refused(outcome) and "Read-only" in outcome[1], outcome
    assert not (a / "escape").exists()


# --- the profile and the environment (portable parts) --------------------------------------


def test_environment_allowlist() -> None:
    source = {"PATH": "/usr/bin", "SECRET": "hunter2", "LC_ALL": "C", "AWS_SECRET_ACCESS_KEY": "k"}
    built = build_environment(STRICT, {"EXTRA": "1"}, source=source)
    assert built == {"PATH": "/usr/bin", "LC_ALL": "C", "EXTRA": "1"}
    assert build_environment(NONE, source=source) == source
    # default: the manager's, as under fork, env= on top
    assert build_environment(DEFAULT, {"EXTRA": "1"}, source=source) == {**source, "EXTRA": "1"}


def test_resolve() -> None:
    assert resolve("strict") is STRICT and resolve(None) is DEFAULT and resolve(NONE) is NONE
    assert not NONE.enabled and DEFAULT.enabled
    with pytest.raises(ValueError, match="isolation must be one of"):
        resolve("paranoid")
    with pytest.raises(ValueError, match="protect_system"):
        Isolation(protect_system="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absolute"):
        Isolation(read_write_paths=("out",))


# --- through a ProcessManager ---------------------------------------------------------------

BENIGN = [3, 5, 8]


def double(value: int) -> int:
    return value * 2


def read_secret() -> tuple[str | None, bool]:
    environ = Path("/proc/self/environ").read_bytes()
    return os.environ.get("SECRET"), b"hunter2" in environ


def fstat_fds(fds: list[int]) -> list[int]:
    still_open = []
    for fd in fds:
        with contextlib.suppress(OSError):
            os.fstat(fd)
            still_open.append(fd)
    return still_open


def _zygote_available() -> bool:
    from sandboxrun import _launch

    return bool(getattr(_launch, "ZYGOTE_AVAILABLE", False))


#: (profile, start method) pairs where the manager's pid is out of a task's reach: the zygote's
#: PID namespace and another uid (every profile; other start methods refuse a profile).
_REACH = [("default", "zygote"), ("strict", "zygote")] if _zygote_available() else []

_MANAGER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
from sandboxrun import ProcessManager, Task
from tests.test_isolation import BENIGN, double, signal_pid
tasks = [Task(signal_pid, (os.getpid(), signal.{signame}))] + [Task(double, (v,)) for v in BENIGN]
with ProcessManager(2, 20, isolation={isolation!r}, start_method={method!r}) as pm:
    for task in tasks:
        pm.queue_task(task)
order = {{id(task): n for n, task in enumerate(tasks)}}
results = sorted(pm.task_results, key=lambda r: order[id(r.task)])
print(json.dumps([[r.success, r.result, repr(r.exception), r.isolation] for r in results]))
"""


_AS_NOBODY_ARGV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _run_manager(
    isolation: str, method: str, signame: str, timeout: float = 60, as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    script = _MANAGER.format(root=str(Path(__file__).parents[1]), isolation=isolation,
                             method=method, signame=signame)  # fmt: skip
    argv = [*(_AS_NOBODY_ARGV if as_nobody else []), sys.executable, "-c", script]
    env = {"PATH": os.environ["PATH"], "SANDBOXRUN_STATE_DIR": "/tmp"} if as_nobody else None
    try:  # the watchdog: a stopped manager is killed here, not waited for
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(expired.cmd, -999, "", "timed out: stopped")


@pytest.mark.parametrize("signame", ["SIGSTOP", "SIGKILL"])
def test_manager_signalled_by_its_task(signame: str) -> None:
    import json

    hit = _run_manager(
        "none", "fork", signame, timeout=15
    )  # the attack reaches its aim without isolation
    assert hit.returncode in (-999, -signal.SIGKILL), hit
    for isolation, method in _REACH:
        run = _run_manager(isolation, method, signame)
        assert run.returncode == 0, run.stderr[-2000:]
        results = json.loads(run.stdout.splitlines()[-1])
        assert results[0][0] is False and results[0][3] == isolation, results[0]
        assert [r[1] for r in results[1:]] == [v * 2 for v in BENIGN]


@pytest.mark.skipif(not _zygote_available(), reason="no zygote launcher")
def test_non_root_manager_signalled_by_its_task() -> None:
    """A non-root manager (nobody; the psutil backend here): its tasks run as its own uid, so
    without a PID namespace a task can kill it. The zygote's user namespace gives every task
    its PID namespace as for root."""
    import json
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv here")
    runs = [*_AS_NOBODY_ARGV, "env", sys.executable, "-c", "pass"]  # as the zygote is started
    if subprocess.run(runs, capture_output=True, timeout=30).returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable} here (an interpreter under /root?)")
    from .conftest import SCALE

    hit = _run_manager("none", "fork", "SIGKILL", timeout=30 * SCALE, as_nobody=True)
    assert hit.returncode == -signal.SIGKILL, (hit.returncode, hit.stderr[-2000:])
    for isolation in ("none", "default"):  # the zygote's PID namespace holds under both
        run = _run_manager(isolation, "zygote", "SIGKILL", timeout=60 * SCALE, as_nobody=True)
        assert run.returncode == 0, (isolation, run.returncode, run.stderr[-2000:])
        results = json.loads(run.stdout.splitlines()[-1])
        assert results[0][0] is False and results[0][3] == isolation, results[0]
        assert [r[1] for r in results[1:]] == [v * 2 for v in BENIGN]


def _in_queue_order(pm: Any) -> list[Any]:
    """read_secret, then the command (its function is ``execute``), then double."""
    rank = {"read_secret": 0, "execute": 1, "double": 2}
    return sorted(pm.task_results, key=lambda r: rank[r.task.func.__name__])


@NEEDS_ZYGOTE
def test_manager_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxrun import CommandTask, ProcessManager, Task

    monkeypatch.setenv("SECRET", "hunter2")
    shown = CommandTask(["sh", "-c", "echo ${SECRET:-absent}"])
    with ProcessManager(2, 20, isolation="none", start_method="fork") as pm:
        pm.queue_task(Task(read_secret))
        pm.queue_task(shown)
    results = _in_queue_order(pm)
    assert results[0].result[0] == "hunter2"  # (the kernel's copy: the test set it late)
    assert results[1].result.stdout.strip() == b"hunter2"
    # default: the manager's environment, as under fork (the drop-in's price, security.md)
    with ProcessManager(2, 20, isolation="default") as pm:
        pm.queue_task(Task(read_secret))
        pm.queue_task(shown)
    results = _in_queue_order(pm)
    assert results[0].result[0] == "hunter2"
    assert results[1].result.stdout.strip() == b"hunter2"
    with ProcessManager(2, 20, isolation="strict") as pm:  # strict scrubs it
        pm.queue_task(Task(read_secret))
        pm.queue_task(shown)
        pm.queue_task(Task(double, (4,)))
    results = _in_queue_order(pm)
    assert results[0].result[0] is None  # /proc/self/environ: see the zygote test
    assert results[1].result.stdout.strip() == b"absent"
    assert results[2].result == 8


@pytest.mark.skipif(not _zygote_available(), reason="no zygote launcher")
def test_manager_secret_not_even_in_proc_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxrun import ProcessManager, Task

    monkeypatch.setenv("SECRET", "hunter2")
    with ProcessManager(2, 20, isolation="strict", start_method="zygote") as pm:  # type: ignore[arg-type]
        pm.queue_task(Task(read_secret))
    assert pm.task_results[0].result == (None, False)


@pytest.mark.skipif(
    not transport.EXIT_BY_PIDFD,
    reason="the portable transport closes only other jobs' fds (docs/security.md)",
)
def test_inherited_fd_and_listening_socket(tmp_path: Path) -> None:
    from sandboxrun import ProcessManager, Task

    with open(tmp_path / "journal", "w") as journal, socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        fds = [journal.fileno(), server.fileno()]
        for isolation in ("default", "strict"):
            with ProcessManager(2, 20, isolation=isolation) as pm:
                pm.queue_task(Task(fstat_fds, (fds,)))
                pm.queue_task(Task(double, (5,)))
            assert sorted(map(repr, (r.result for r in pm.task_results))) == ["10", "[]"]


@pytest.fixture
def outside_tmp() -> Path:
    """A scratch folder outside /tmp (private under default): next to the tests, or where the
    tests' tmp folders go when the checkout is read-only (the guest)."""
    parent = Path(__file__).parent
    if not os.access(parent, os.W_OK) or under_private_tmp(parent):  # a clone under /tmp
        parent = _writable_runs_folder()
    folder = parent / f".scratch-{uuid.uuid4().hex}"
    folder.mkdir()
    yield folder  # type: ignore[misc]
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


@NEEDS_ZYGOTE
def test_seed_examples_under_default(outside_tmp: Path) -> None:
    """The seed's two patterns: write the output file given as an argument; return its bytes."""
    from sandboxrun import ProcessManager, Task

    source = outside_tmp / "in.txt"
    source.write_bytes(b"input")
    with ProcessManager(2, 20, isolation="default") as pm:
        pm.queue_task(Task(write_file, (str(outside_tmp / "out.txt"), "converted")))
        pm.queue_task(Task(Path.read_bytes, (source,)))
    assert sorted(map(repr, (r.result for r in pm.task_results))) == ["'written'", "b'input'"]
    assert (outside_tmp / "out.txt").read_text() == "converted"
    assert {r.isolation for r in pm.task_results} == {"default"}


@NEEDS_ZYGOTE
def test_default_profile_and_operator_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxrun import ProcessManager
    from sandboxrun._isolation import choose

    monkeypatch.delenv("SANDBOXRUN_ISOLATION", raising=False)
    assert choose(None) is DEFAULT and ProcessManager(1).isolation is DEFAULT
    monkeypatch.setenv("SANDBOXRUN_ISOLATION", "strict")
    assert ProcessManager(1).isolation is STRICT
    assert ProcessManager(1, isolation="none").isolation is NONE  # the caller's choice wins


def test_strict_refused_where_unavailable() -> None:
    from sandboxrun import ProcessManager

    with pytest.raises(ValueError, match="isolation must be one of"):
        ProcessManager(1, isolation="paranoid")  # type: ignore[arg-type]


# --- a non-root manager: an unprivileged user namespace --------------------------------------

_AS_NOBODY = """
import json, os, sys
sys.path.insert(0, {root!r})
from sandboxrun import _transport as transport
from sandboxrun._isolation import DEFAULT, NONE, probe
from tests.isolated import run_isolated
from tests.test_isolation import clone3_into, connect_unix, leave_files
pair = {pair!r}
clone3 = [run_isolated(p, clone3_into, pair[1]) for p in (NONE, DEFAULT)] if pair else None
print(json.dumps({{
    "probe": probe(),
    "clone3": clone3,
    "socket": [run_isolated(p, connect_unix, {sock!r})[0] for p in (NONE, DEFAULT)],
    "isolated": run_isolated(DEFAULT, leave_files, {name!r})[0],
    "left": [os.path.exists(d + "/" + {name!r}) for d in ("/tmp", "/dev/shm")],
    "none": run_isolated(NONE, leave_files, {name!r})[0],
    "left_by_none": [os.path.exists(d + "/" + {name!r}) for d in ("/tmp", "/dev/shm")],
}}))
"""


@pytest.fixture
def nobody_v2_pair() -> tuple[str, str] | None:
    """Two cgroup2 directories delegated to nobody (a non-root manager's own subtree, as
    systemd's Delegate= gives it), or None where there is no cgroup2 to make them in."""
    from sandboxrun._backends import cgroupfs

    own = cgroupfs.own_cgroups().get("")
    point = next((p for kind, p, _ in cgroupfs.mounts() if kind == "cgroup2"), None)
    if own is None or point is None:
        yield None
        return
    runner = point / own.lstrip("/") / f"sandboxrun-isotest-nobody-{os.getpid()}"
    pair = runner / "a", runner / "b"
    try:
        for directory in pair:
            directory.mkdir(parents=True)
        for directory in (runner, *pair):  # the delegatee owns the dirs and their procs files
            os.chown(directory, 65534, 65534)
            os.chown(directory / "cgroup.procs", 65534, 65534)
    except OSError:
        _remove_cgroups(*pair, runner)
        yield None
        return
    yield str(pair[0]), str(pair[1])
    _remove_cgroups(*pair, runner)


def test_non_root_manager_gets_a_user_namespace(
    scratch: list[Path], nobody_v2_pair: tuple[str, str] | None
) -> None:
    import json
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv here")
    name = f"sandboxrun-nobody-{uuid.uuid4().hex}"
    path = Path("/run", f"sandboxrun-test-{uuid.uuid4().hex[:12]}.sock")
    scratch += [path, Path("/tmp", name), Path("/dev/shm", name)]
    script = _AS_NOBODY.format(root=str(Path(__file__).parents[1]), sock=str(path), name=name,
                               pair=nobody_v2_pair)  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        os.chmod(path, 0o777)
        server.listen(8)
        # Placed in its delegated cgroup "a" by root first (as systemd would start it there).
        place = f'echo $$ > "{nobody_v2_pair[0]}/cgroup.procs"; ' if nobody_v2_pair else ""
        done = subprocess.run(
            ["sh", "-c", place + 'exec "$@"', "sh", "setpriv", "--reuid=65534", "--regid=65534",
             "--clear-groups", sys.executable, "-c", script],
            capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    if found["probe"].get("user_namespace") is not True:
        pytest.skip(f"no unprivileged user namespaces here: {found['probe']}")
    assert found["socket"] == ["ok", "raised"]  # nobody reaches root's socket, then not
    assert found["isolated"] == found["none"] == "ok"
    # default: the host's /tmp (the file stays, nobody's own), its own /dev/shm (gone)
    assert found["left"] == [True, False] and found["left_by_none"] == [True, True]
    if nobody_v2_pair is not None:  # its own delegated cgroups: "none" moves, "default" cannot
        (kind, where), (refused, why) = found["clone3"]
        assert kind == "ok" and "/b" in where, found["clone3"]
        assert refused == "raised" and "No such file" in why, found["clone3"]


def cgroup_v2_line() -> str:
    return next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x[:3] == "0::")


@pytest.mark.parametrize("method", ["zygote"] if _zygote_available() else [])
def test_manager_task_cannot_clone3_into_another_cgroup(
    kernel_backend: str, method: str, v2_pair: tuple[Path, Path]
) -> None:
    """The attack through a real manager, where the limits live on cgroup v2 (the guest's
    cgroup_v2 and systemd backends): a root task's clone3(CLONE_INTO_CGROUP) into a cgroup
    beside its own lands there under "none", and finds no such cgroup under "default"."""
    from sandboxrun import ProcessManager, Task

    _, b = v2_pair
    if kernel_backend not in ("cgroup_v2", "systemd"):
        pytest.skip(f"{kernel_backend}: the limits are not on cgroup v2 (its cgroup2 is empty)")
    outcomes = {}
    for isolation in ("none", "default"):
        manager = ProcessManager(2, 20, backend=kernel_backend, isolation=isolation,
                                 start_method=method)  # type: ignore[arg-type]  # fmt: skip
        with manager as pm:
            pm.queue_task(Task(clone3_into, (str(b),)))
            pm.queue_task(Task(cgroup_v2_line))
        results = {r.task.func.__name__: r for r in pm.task_results}
        outcomes[isolation] = results
    escaped = outcomes["none"]["clone3_into"]
    assert escaped.success and "/b" in escaped.result, escaped
    refused = outcomes["default"]["clone3_into"]
    assert not refused.success and isinstance(refused.exception, FileNotFoundError), refused
    assert outcomes["default"]["cgroup_v2_line"].result == "0::/"  # its own namespace's root
    assert (b / "cgroup.procs").read_text() == ""


# --- the zygote's prepared view (built once, a private copy per task) ----------------------


def mount_namespace_and_listings(*folders: str) -> tuple[int, list[list[str]]]:
    return os.stat("/proc/self/ns/mnt").st_ino, [sorted(os.listdir(f)) for f in folders]


def _umount(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(str(path)), 2) != 0:  # MNT_DETACH
        raise OSError(ctypes.get_errno(), f"umount2 {path}")


def _view_inode(profile: Isolation) -> int:
    from sandboxrun._isolation import _view

    assert _view._views is not None and profile in _view._views.fds, "no view was prepared"
    return os.stat(f"/proc/self/fd/{_view._views.fds[profile]}").st_ino


def test_prepared_view_is_held_and_each_task_gets_a_copy(view: str) -> None:
    if view != "prepared view":
        pytest.skip("about the prepared view only")
    name = f"sandboxrun-leftover-{uuid.uuid4().hex}"
    assert run_isolated(PRIVATE_TMP, leave_files, name) == ("ok", "written")
    held = _view_inode(PRIVATE_TMP)
    first = run_isolated(PRIVATE_TMP, mount_namespace_and_listings, "/tmp", "/dev/shm")
    second = run_isolated(PRIVATE_TMP, mount_namespace_and_listings, "/tmp", "/dev/shm")
    assert first[0] == "ok" and second[0] == "ok", (first, second)
    assert _view_inode(PRIVATE_TMP) == held  # the same view served all three tasks
    # Each task in a copy, never the view itself nor ours. (The two tasks' numbers may be
    # equal: nsfs inode numbers are recycled once a namespace is freed, as the first one is.)
    for task in (first, second):
        assert task[1][0] not in (held, os.stat("/proc/self/ns/mnt").st_ino), (task, held)
    for listing in (*first[1][1], *second[1][1]):
        assert name not in listing, listing  # nothing of one task is seen by the next


def test_prepared_view_follows_host_mounts_made_later(outside_tmp: Path) -> None:
    assert run_isolated(DEFAULT, double, 1) == ("ok", 2)  # the view exists from here
    point = outside_tmp / "mounted-later"
    point.mkdir()
    try:
        _libc_mount = ctypes.CDLL(None, use_errno=True).mount
        assert _libc_mount(b"tmpfs", os.fsencode(str(point)), b"tmpfs", 0, b"size=1m") == 0
        try:
            (point / "seen").write_text("x")
            assert run_isolated(DEFAULT, os.listdir, str(point)) == ("ok", ["seen"])
        finally:
            _umount(point)
    finally:
        point.rmdir()


def test_prepared_view_hides_a_socket_folder_made_later(outside_tmp: Path) -> None:
    import dataclasses

    folder = outside_tmp / "sockets"
    profile = dataclasses.replace(DEFAULT, name="custom",
                                  hide_sockets=(*DEFAULT.hide_sockets, str(folder)))  # fmt: skip
    assert run_isolated(profile, double, 1) == ("ok", 2)  # built while the folder is missing
    folder.mkdir()
    path = folder / "s.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(8)
            assert run_isolated(NONE, connect_unix, str(path)) == ("ok", "connected")
            outcome = run_isolated(profile, connect_unix, str(path))
            assert _refused(outcome) and "No such file" in outcome[1], outcome
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()


def read_then_write(source: str, target: str) -> str:
    data = Path(source).read_text()
    Path(target).write_text(data)
    return data


def test_run_from_a_folder_under_tmp_holding_inputs_and_outputs() -> None:
    """A checkout under /tmp, run from its top (the demo from a fresh clone there): its input
    folder (read-only) and output folder (writable) lie below the working directory. The cwd's
    bind-back once covered the input's own mount (every task failed: EINVAL), and a read-only
    pass over it would have made the output read-only too."""
    top = Path(tempfile.mkdtemp(prefix="sandboxrun-cwd-", dir="/tmp"))
    old = os.getcwd()
    try:
        (top / "in").mkdir()
        (top / "out").mkdir()
        (top / "in" / "a.txt").write_text("input")
        profile = ROOT_PRIVATE_TMP.with_paths([str(top / "out")], [str(top / "in")])
        os.chdir(top)
        assert run_isolated(profile, read_then_write, "in/a.txt", "out/b.txt") == ("ok", "input")
        assert (top / "out" / "b.txt").read_text() == "input"
        outcome = run_isolated(profile, write_file, "in/planted.txt", "x")
        assert _refused(outcome) and "Read-only" in outcome[1], outcome
    finally:
        os.chdir(old)
        shutil.rmtree(top, ignore_errors=True)


# --- sandboxrun, its Python and the task's code under /tmp -----------------------------------

_FROM_TMP = """
import json, os, sys
top, sibling = sys.argv[1:3]
sys.path.insert(0, top)
import sandboxrun
from sandboxrun import CommandTask, ProcessManager, Task
from sandboxrun._isolation import STRICT, unavailable_reason
found = {"file": sandboxrun.__file__, "prefix": sys.prefix, "reason": unavailable_reason(STRICT)}
show = "import sys; sys.path.insert(0, sys.argv[1]); import sandboxrun; print(sandboxrun.__file__)"
tasks = [Task(os.path.exists, (sibling,)), Task(os.listdir, ("/tmp",)), Task(os.getuid),
         CommandTask([sys.executable, "-c", show, top])]
with ProcessManager(1, 60, isolation="strict") as manager:
    for task in tasks:
        manager.queue_task(task)
results = {id(result.task): result for result in manager.task_results}
found["results"] = [results[id(task)].result if results[id(task)].success
                    else f"failed: {results[id(task)].exception}" for task in tasks]
found["results"][3] = found["results"][3].stdout.decode().strip()
print(json.dumps(found))
"""


def _only_kept_in_tmp(listing: list[str], top: Path, sibling: Path) -> None:
    """The task's /tmp: ``top``, and what the tests themselves run from there (a clone under
    /tmp: its checkout and venv); never ``sibling``, a file next to them."""
    ours = [Path(os.path.realpath(p)) for p in (*sys.path, sys.prefix) if p.startswith("/")]
    kept = {p.relative_to("/tmp").parts[0] for p in ours if p.is_relative_to("/tmp/")}
    assert top.name in listing and sibling.name not in listing, listing
    assert set(listing) <= {top.name} | kept, listing


@NEEDS_ZYGOTE
def test_strict_with_sandboxrun_and_its_python_under_tmp() -> None:
    """A checkout and its venv under /tmp (a fresh clone there): the probe and the strict view
    see them through the task's private /tmp, read-only, so strict works and its slot uid
    imports sandboxrun; nothing else of the host's /tmp shows (a file next to the checkout)."""
    from .conftest import SCALE

    top = Path(tempfile.mkdtemp(prefix="sandboxrun-clone-", dir="/tmp"))
    sibling = Path(tempfile.mkstemp(prefix="sandboxrun-sibling-", dir="/tmp")[1])
    try:
        top.chmod(0o755)  # as a clone's folder is (mkdtemp's are 0700)
        package = Path(__file__).resolve().parents[1] / "sandboxrun"
        shutil.copytree(package, top / "sandboxrun", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(top / "venv")],
                       check=True, timeout=120 * SCALE)  # fmt: skip
        import psutil
        import typer

        # Where typer and psutil come from: a venv's site-packages here, PYTHONPATH in the guest.
        deps = sorted({str(Path(str(module.__file__)).parents[1]) for module in (psutil, typer)})
        run = subprocess.run(
            [str(top / "venv" / "bin" / "python"), "-c", _FROM_TMP, str(top), str(sibling)],
            capture_output=True, text=True, cwd=top, timeout=120 * SCALE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(deps), "SANDBOXRUN_ISOLATION": ""},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        found = json.loads(run.stdout.splitlines()[-1])
        assert found["file"] == str(top / "sandboxrun" / "__init__.py")
        assert found["prefix"] == str(top / "venv") and found["reason"] is None, found
        shown = str(top / "sandboxrun" / "__init__.py")
        assert found["results"][::2] == [False, DEFAULT_UID_BASE] and found["results"][3] == shown
        _only_kept_in_tmp(found["results"][1], top, sibling)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        sibling.unlink()


def test_sockets_inside_a_folder_under_tmp_kept_visible_stay_hidden() -> None:
    """hide_sockets inside what the private /tmp binds back (a checkout there): hidden too,
    while the rest of the folder stays readable and nothing beside it shows."""
    import dataclasses

    top = Path(tempfile.mkdtemp(prefix="sandboxrun-kept-", dir="/tmp"))
    sibling = Path(tempfile.mkstemp(prefix="sandboxrun-sibling-", dir="/tmp")[1])
    sockets = top / "sockets"
    try:
        top.chmod(0o755)
        sockets.mkdir()
        (top / "code.py").write_text("kept")
        profile = dataclasses.replace(
            PRIVATE_TMP, hide_sockets=(*DEFAULT.hide_sockets, str(sockets)),
            read_only_paths=(str(top),),
        )  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(sockets / "s.sock"))
            server.listen(8)
            assert run_isolated(NONE, connect_unix, str(sockets / "s.sock")) == ("ok", "connected")
            outcome = run_isolated(profile, connect_unix, str(sockets / "s.sock"))
            assert _refused(outcome) and "No such file" in outcome[1], outcome
        assert run_isolated(profile, Path.read_text, top / "code.py") == ("ok", "kept")
        assert run_isolated(profile, os.path.exists, str(sibling)) == ("ok", False)
        listing = run_isolated(profile, os.listdir, "/tmp")
        assert listing[0] == "ok", listing
        _only_kept_in_tmp(listing[1], top, sibling)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        sibling.unlink()
