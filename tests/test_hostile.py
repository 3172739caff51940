"""Hostile workers against the manager's trust boundary (issue 10, points 1-3 and fd hygiene).

Each attack runs on every backend here, in a batch with benign tasks that must come back right:
a task whose result pickles to ``os.system``, raw forged frames written into the result fd, a
``CommandTask`` whose command writes into the worker's pipe through ``/proc/$PPID/fd``, frames
announcing more than ``max_result_bytes``, and a task looking for (and poking at) the manager's
inherited fds. Where a task may hang or bloat the manager, the manager runs in a subprocess
under a watchdog and reports its peak RSS.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sandboxrun import CommandTask, ProcessManager, Task, TaskResult, WorkerDied
from sandboxrun import _header as header
from sandboxrun import _transport as transport
from sandboxrun._errors import ProtocolError, ResultTooLarge, ResultTypeRefused
from sandboxrun._launch import ZYGOTE_AVAILABLE

from .conftest import SCALE

# These attacks write raw bytes into the worker's result fd: they test the POSIX transport's
# reader (prefix checked before any allocation). The portable transport frames messages itself
# (multiprocessing.connection); its bound is the drain thread's budget (docs/security.md).
RAW_FRAMES = pytest.mark.skipif(
    transport.NAME != "posix", reason="raw result-fd frames: the POSIX transport's reader"
)

PREFIX = struct.Struct(">QQ")
MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
BENIGN: list[tuple[Any, tuple[Any, ...], Any]] = [
    (len, ("abc",), 3),
    (sum, ([1, 2, 3],), 6),
    (str.upper, ("x",), "X"),
]


class Evil:
    """Pickles to ``os.system(command)``: unpickling it anywhere runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def return_evil(marker: str) -> Evil:
    return Evil(f"touch {marker}")


def _own_result_fd() -> int:
    """The task's result pipe: its only writable pipe above 2 (the worker closed the rest)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode) and _writable(fd):
                return fd
        except OSError:
            continue
    raise RuntimeError("no result pipe")


def _writable(fd: int) -> bool:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def write_frame(data: bytes) -> None:
    """Write raw bytes as this task's result frame, then die before the worker writes one."""
    fd = _own_result_fd()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os._exit(0)


def stream_frame(body_size: int, chunk_mib: int = 1) -> None:
    """Announce a body of ``body_size`` bytes and stream zeros as long as the pipe takes them."""
    fd = _own_result_fd()
    head = header.encode(header.Header(header.RETURNED))
    os.write(fd, PREFIX.pack(len(head), body_size) + head)
    chunk = bytes(chunk_mib * MIB)
    sent = 0
    try:
        while sent < body_size:
            sent += os.write(fd, chunk[: body_size - sent])
    except BrokenPipeError:
        os._exit(3)
    os._exit(0)


def list_fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listdir's own fd, closed by now
            continue
    return found


def delete_epoll_registrations() -> list[int]:
    """EPOLL_CTL_DEL every fd from every inherited epoll fd; the epoll fds it found."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    event = ctypes.create_string_buffer(16)
    found = []
    for fd, target in list_fds().items():
        if target == "anon_inode:[eventpoll]":
            found.append(fd)
            for victim in range(1024):
                libc.epoll_ctl(fd, 2, victim, event)  # 2 = EPOLL_CTL_DEL
    return found


def stream_targets() -> set[str]:
    """What this process's sys.stdin/stdout/stderr fds point at (those that have one)."""
    found = {os.devnull}
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            found.add(os.readlink(f"/proc/self/fd/{stream.fileno()}"))
        except (OSError, ValueError, io.UnsupportedOperation):
            continue
    return found


def _frame(head: bytes, body: bytes = b"") -> bytes:
    return PREFIX.pack(len(head), len(body)) + head + body


def _returned(body: bytes) -> bytes:
    return _frame(header.encode(header.Header(header.RETURNED)), body)


GOOD_HEAD = header.encode(header.Header(header.RETURNED))
FORGED: dict[str, tuple[bytes, type[BaseException] | tuple[type[BaseException], ...]]] = {
    "garbage": (b"\x00\x00\x00\x00\x00\x00\x00\x30" + os.urandom(8) + b"\xff" * 48,
                (ProtocolError, ResultTooLarge)),
    "garbage header": (_frame(b"\x80\x05garbage-garbage-garbage-garbage-garbage-garbage"),
                       ProtocolError),
    "header is a pickled list": (_frame(pickle.dumps(["returned", 1, 2] * 10), b"N."),
                                 ProtocolError),
    "header of wrong types": (_frame(pickle.dumps({"kind": 7, "max_rss_bytes": "x",
                                                   "cpu_time_seconds": [], "text": None})),
                              ProtocolError),
    "bad kind in a binary header": (_frame(b"SBR1\xc8" + GOOD_HEAD[5:], pickle.dumps(1)),
                                    ProtocolError),
    "header length 2**64-1": (PREFIX.pack(2**64 - 1, 0), ProtocolError),
    "body length 2**64-1": (PREFIX.pack(len(GOOD_HEAD), 2**64 - 1) + GOOD_HEAD, ResultTooLarge),
    "header that unpickles to SystemExit": (_frame(pickle.dumps(SystemExit(3))), ProtocolError),
    "success with an os.system body": (_returned(pickle.dumps(Evil("true"))), ResultTypeRefused),
    "cut-off frame": (PREFIX.pack(len(GOOD_HEAD), 100) + GOOD_HEAD + b"x", WorkerDied),
}  # fmt: skip


def run_batch(backend: str, hostile: list[Task], **options: Any) -> list[TaskResult]:
    """Run ``hostile`` among benign tasks; check the benign ones; the hostile results."""
    options.setdefault("worker_timeout_seconds", 60 * SCALE)
    with ProcessManager(2, backend=backend, **options) as pm:  # type: ignore[arg-type]
        for func, args, _ in BENIGN:
            pm.queue_task(Task(func, args))
        for task in hostile:
            pm.queue_task(task)
        for func, args, _ in BENIGN:
            pm.queue_task(Task(func, args))
    by_task = {id(result.task): result for result in pm.task_results}
    assert len(pm.task_results) == 2 * len(BENIGN) + len(hostile)
    for result in pm.task_results:
        task = result.task
        expected = next(
            (want for func, args, want in BENIGN if task.func is func and task.args == args), None
        )
        if expected is not None:
            assert result.success and result.result == expected, result
    return [by_task[id(task)] for task in hostile]


# ---------------------------------------------------------------------- code execution


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_reduce_result_runs_nothing_in_the_manager(
    backend: str, start_method: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    (result,) = run_batch(backend, [Task(return_evil, (str(marker),))], start_method=start_method,
                         isolation="none")
    assert not marker.exists(), "the task's result ran os.system in the manager"
    assert not result.success and result.result is None
    assert isinstance(result.exception, ResultTypeRefused)
    assert result.exception.type_name in ("posix.system", "os.system")
    assert "trusted_results=True" in str(result.exception)


def test_trusted_results_restores_full_pickle(tmp_path: Path) -> None:
    """The opt-out does what it says (so the default's refusal is the rule's doing)."""
    marker = tmp_path / "MARKER"
    with ProcessManager(1, backend="psutil", trusted_results=True) as pm:
        pm.queue_task(Task(return_evil, (str(marker),)))
    assert marker.exists() and pm.task_results[0].success


@RAW_FRAMES
@pytest.mark.parametrize("name", list(FORGED))
def test_forged_frame_fails_only_its_task(backend: str, name: str) -> None:
    data, expected = FORGED[name]
    (result,) = run_batch(backend, [Task(write_frame, (data,))])
    assert not result.success and result.result is None
    assert isinstance(result.exception, expected), result.exception


@RAW_FRAMES
def test_systemexit_body_is_the_tasks_exception_only(backend: str) -> None:
    data = _frame(header.encode(header.Header(header.RAISED)), pickle.dumps(SystemExit(3)))
    (result,) = run_batch(backend, [Task(write_frame, (data,))])
    assert not result.success and isinstance(result.exception, SystemExit)


COMMAND_SCRIPT = textwrap.dedent("""
    import os, pickle, stat, struct, sys
    marker, variant = sys.argv[1], sys.argv[2]
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + marker,))
    evil = pickle.dumps(Evil())
    if variant == "header":
        frame = struct.pack(">QQ", len(evil), 0) + evil
    else:
        head = bytes.fromhex(sys.argv[3])
        frame = struct.pack(">QQ", len(head), len(evil)) + head + evil
    # The worker's pid as /proc numbers it (os.getppid() answers in the task's PID namespace).
    parent = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[1]
    hits = 0
    for name in os.listdir(f"/proc/{parent}/fd"):
        path = f"/proc/{parent}/fd/{name}"
        try:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                continue
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, frame)
            hits += 1
        except OSError:
            pass
        os.close(fd)
    print("wrote", hits)
""")


@RAW_FRAMES
@pytest.mark.parametrize("variant", ["header", "body"])
@pytest.mark.parametrize("isolation", ["none", "default"])
def test_command_task_writing_into_the_result_pipe(
    backend: str, variant: str, isolation: str, tmp_path: Path
) -> None:
    """The command reopens its worker's result pipe through /proc and writes a forged frame.
    Under "none" (the worker's uid) the frame arrives and the manager refuses it; under the
    default profile the pipe, made by the zygote as root (0600), cannot even be reopened by the
    task's uid: the forged frame reaches only the command's own output pipes, and the command's
    own result stands."""
    marker = tmp_path / "MARKER"
    script = tmp_path / "forge.py"
    script.write_text(COMMAND_SCRIPT)
    command = [sys.executable, str(script), str(marker), variant, GOOD_HEAD.hex()]
    (result,) = run_batch(backend, [CommandTask(command)], isolation=isolation)
    assert not marker.exists(), "the command ran code in the manager"
    if isolation == "default" and ZYGOTE_AVAILABLE:
        assert result.success, result.exception
        return
    assert not result.success
    expected = ProtocolError if variant == "header" else ResultTypeRefused
    assert isinstance(result.exception, expected), result.exception


# ---------------------------------------------------------------------- bounded memory

MANAGER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from sandboxrun import ProcessManager, Task
    from tests import test_hostile as hostile
    options = json.loads(sys.argv[2])
    func = getattr(hostile, options.pop("func"))
    args = tuple(options.pop("args"))
    with ProcessManager(2, **options) as pm:
        pm.queue_task(Task(len, ("abc",)))
        pm.queue_task(Task(func, args))
        pm.queue_task(Task(len, ("abcd",)))
    def peak_rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    print(json.dumps({
        "results": [[r.success, r.result, type(r.exception).__name__] for r in pm.task_results],
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
        # (a big pytest process would set the floor); VmHWM is this address space's own.
        "peak_rss_mib": peak_rss_kib() / 1024,
    }))
""")


def run_manager(options: dict[str, Any], watchdog: float = 120) -> dict[str, Any]:
    """Run a manager in a subprocess (so a hang or a blow-up cannot take pytest with it)."""
    done = subprocess.run(
        [sys.executable, "-c", MANAGER_SCRIPT, str(ROOT), json.dumps(options)],
        capture_output=True, text=True, timeout=watchdog * SCALE, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    print(f"manager peak RSS: {report['peak_rss_mib']:.1f} MiB")
    return report


def _check_bounded(report: dict[str, Any], limit_mib: float) -> None:
    results = report["results"]
    assert [True, 3, "NoneType"] in results and [True, 4, "NoneType"] in results, results
    assert [False, None, "ResultTooLarge"] in results, results
    assert report["peak_rss_mib"] < limit_mib


@RAW_FRAMES
@pytest.mark.parametrize("cap", [64 * MIB, None], ids=["max_result_bytes=64MiB", "default"])
def test_two_gib_frame_under_a_256_mib_task(backend: str, cap: int | None) -> None:
    """The default cap under a memory limit is that limit (256 MiB here)."""
    options: dict[str, Any] = {"backend": backend, "func": "stream_frame", "args": [2 << 30]}
    options.update(memory_limit_in_gib=0.25, worker_timeout_seconds=60)
    if cap is not None:
        options["max_result_bytes"] = cap
    _check_bounded(run_manager(options), limit_mib=200)


@RAW_FRAMES
def test_frame_announcing_a_tebibyte_with_the_default_cap(backend: str) -> None:
    options = {"backend": backend, "func": "stream_frame", "args": [1 << 40]}
    _check_bounded(run_manager(options), limit_mib=200)


# ---------------------------------------------------------------------- fd hygiene


@RAW_FRAMES
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_task_sees_only_its_own_fds(backend: str, start_method: str, tmp_path: Path) -> None:
    # The task keeps what sys.stdin/stdout/stderr write to (here pytest's capture files; under
    # spawn/forkserver multiprocessing reopens stdin on /dev/null): its output, not a leak.
    streams = stream_targets()
    with open(tmp_path / "journal", "a"), select.epoll():  # what an embedding server has open
        (result,) = run_batch(backend, [Task(list_fds)], start_method=start_method,
                                 isolation="none")
    assert result.success, result.exception
    extra = {fd: t for fd, t in result.result.items() if fd > 2 and t not in streams}
    pipes = [target for target in extra.values() if target.startswith("pipe:")]
    assert len(pipes) == 1 and len(extra) == 1, extra  # the result pipe, nothing else


def test_task_cannot_unregister_the_managers_epoll(backend: str) -> None:
    """On old code this hangs the manager (its registrations dropped): hence the subprocess."""
    options = {"backend": backend, "func": "delete_epoll_registrations", "args": [],
               "start_method": "fork", "worker_timeout_seconds": 30,
               "isolation": "none"}  # fmt: skip
    report = run_manager(options, watchdog=60)
    assert sorted(map(str, report["results"])) == sorted(
        map(str, [[True, 3, "NoneType"], [True, [], "NoneType"], [True, 4, "NoneType"]])
    )


def test_a_failure_while_building_one_result_fails_that_task_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever goes wrong in decoding/classifying one job becomes its failed result."""
    from sandboxrun import SandboxrunError, _outcome

    real = _outcome._build_result

    def flaky(job: Any, *args: Any) -> TaskResult:
        if job.task.func is write_frame:
            raise RuntimeError("a bug reached by odd bytes")
        return real(job, *args)

    monkeypatch.setattr(_outcome, "_build_result", flaky)
    (result,) = run_batch("psutil", [Task(write_frame, (b"",))], start_method="fork",
                          isolation="none")
    assert not result.success and isinstance(result.exception, SandboxrunError)
    assert isinstance(result.exception.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_result_bytes": 0}, ValueError),
        ({"max_result_bytes": -1}, ValueError),
        ({"max_result_bytes": 2**64}, ValueError),
        ({"max_result_bytes": 1.5}, TypeError),
        ({"max_result_bytes": "1G"}, TypeError),
        ({"allowed_result_types": [len]}, TypeError),
        ({"allowed_result_types": Evil}, TypeError),
        ({"trusted_results": "yes"}, TypeError),
    ],
)
def test_trust_options_are_validated(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        ProcessManager(1, backend="psutil", **kwargs)


def test_trust_option_defaults() -> None:
    assert ProcessManager(1, backend="psutil").max_result_bytes == 1 << 30
    assert (
        ProcessManager(1, backend="psutil", memory_limit_in_gib=0.25).max_result_bytes == 256 * MIB
    )
    assert ProcessManager(1, backend="psutil", max_result_bytes=5).max_result_bytes == 5
