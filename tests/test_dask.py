"""Sandboxed tasks on a real Dask cluster on 127.0.0.1: a scheduler and two workers, started
here as processes (each in its own session, killed by process group at teardown)."""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandboxrun.dask import sandboxed, sandboxed_result

from . import tasks
from .conftest import SCALE, wait_until
from .test_cli import CONVERTER, journal

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                       reason="distributed is not installed (pip install 'sandboxrun[dask]')"),
]  # fmt: skip

REPO = Path(__file__).resolve().parent.parent
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
CLI = [sys.executable, "-m", "sandboxrun"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # tests.tasks must import on the workers
        # A nanny's worker is daemonic by default, and a daemonic process may not start the
        # sandboxed processes (sandboxrun.dask says so when it is not set).
        "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
    }
    with log.open("wb") as output:
        return subprocess.Popen(argv, cwd=REPO, env=environment, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the nanny and its worker
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    # Imported here, not at collection: distributed registers tblib's exception reducers in
    # copyreg for the whole process, which the other test files' in-process pickles (and fork
    # workers) would inherit. They are put back as they were once the cluster is gone.
    reducers = dict(copyreg.dispatch_table)
    try:
        yield from _cluster(tmp_path_factory)
    finally:
        copyreg.dispatch_table.clear()
        copyreg.dispatch_table.update(reducers)


def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    distributed = importlib.import_module("distributed")
    logs = tmp_path_factory.mktemp("dask-logs")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    started = [_start([*DASK, "--host", "127.0.0.1", "--port", str(port),
                       "--dashboard-address", "127.0.0.1:0"], logs / "scheduler.log")]  # fmt: skip
    try:
        for name in ("w1", "w2"):
            started.append(_start([*WORKER, address, "--name", name, "--nthreads", "1",
                                   "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                                   "--memory-limit", "0"], logs / f"{name}.log"))  # fmt: skip
        client = distributed.Client(address, timeout=30 * SCALE)
        try:
            client.wait_for_workers(2, timeout=60 * SCALE)
            yield address, client
        finally:
            client.close()
    except BaseException:
        for log in sorted(logs.iterdir()):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
        raise
    finally:
        for process in reversed(started):
            _stop(process)


def test_values_come_back_from_fresh_processes_on_the_workers(cluster: tuple[str, Any]) -> None:
    _, client = cluster
    worker_pids = set(client.run(os.getpid).values())
    futures = client.map(sandboxed(tasks.pid_and_value), range(6), pure=False)
    results = client.gather(futures)
    assert [value for _, value in results] == list(range(6))
    pids = {pid for pid, _ in results}
    assert len(pids) == 6 and not pids & worker_pids  # never in a worker process itself
    assert len({f.key for f in futures}) == 6


def test_limits_are_results_not_worker_crashes(cluster: tuple[str, Any]) -> None:
    _, client = cluster
    workers_before = set(client.scheduler_info()["workers"])
    oom = client.submit(
        sandboxed(tasks.allocate, memory_limit_in_gib=0.1), 20, 30, 0.02, pure=False
    )
    slow = client.submit(
        sandboxed(tasks.sleep_then, worker_timeout_seconds=0.5 * SCALE), 30, pure=False
    )
    raising = client.submit(sandboxed(tasks.raise_value_error), "bad", pure=False)
    with pytest.raises(MemoryError):
        oom.result(timeout=60 * SCALE)
    with pytest.raises(TimeoutError):
        slow.result(timeout=60 * SCALE)
    with pytest.raises(ValueError, match="bad"):
        raising.result(timeout=60 * SCALE)
    full = client.submit(
        sandboxed_result(tasks.allocate, memory_limit_in_gib=0.1), 20, 30, 0.02, pure=False
    ).result(timeout=60 * SCALE)
    assert full.out_of_memory and not full.success and isinstance(full.exception, MemoryError)
    assert full.backend  # the worker's own backend filled it in
    # The same two workers (no restart): the limits never touched the worker processes.
    assert set(client.scheduler_info()["workers"]) == workers_before
    assert client.submit(sandboxed(tasks.double), 21, pure=False).result(timeout=60) == 42


def test_batch_over_the_cluster_survives_a_kill_and_resumes(
    cluster: tuple[str, Any], tmp_path: Path
) -> None:
    address, _ = cluster
    (tmp_path / "in").mkdir()
    (tmp_path / "conv.py").write_text(CONVERTER)
    for index in range(8):
        (tmp_path / "in" / f"{index}.txt").write_bytes(b"SLOW %f" % (0.4 * SCALE))
    (tmp_path / "in" / "fail.txt").write_bytes(b"FAIL")
    args = [
        "batch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress",
        "--cmd", f"{sys.executable} {tmp_path / 'conv.py'} {{input}} {{output}}",
        "--scheduler", address, "--timeout", "30s",
    ]  # fmt: skip
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = tmp_path / "out" / "sandboxrun-journal.jsonl"
    reached = wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= 3, 60)
    process.kill()
    _, err = process.communicate(timeout=30)
    assert reached, err.decode()
    first = [entry["file"] for entry in journal(tmp_path)]
    assert 3 <= len(first) < 9
    finished = subprocess.run([*CLI, *args, "--resume"], capture_output=True,
                              timeout=90 * SCALE)  # fmt: skip
    assert finished.returncode == 1, finished.stderr.decode()  # fail.txt failed: exit 1
    entries = journal(tmp_path)
    files = [entry["file"] for entry in entries]
    expected = sorted([*(f"{index}.txt" for index in range(8)), "fail.txt"])
    assert sorted(files) == expected  # each file exactly once, across both runs
    assert files[: len(first)] == first
    verdicts = {entry["file"]: entry["verdict"] for entry in entries}
    assert verdicts.pop("fail.txt") == "failed"
    assert set(verdicts.values()) == {"ok"}
    assert (tmp_path / "out" / "0.txt").read_bytes().startswith(b"SLOW")
    assert b"each Dask worker" in finished.stderr


def test_a_worker_that_dies_mid_task_loses_no_record(
    cluster: tuple[str, Any], tmp_path: Path
) -> None:
    _, client = cluster
    pid_file = tmp_path / "pid"
    future = client.submit(
        sandboxed_result(tasks.wait_for_file), str(pid_file), str(tmp_path / "go"), 60,
        pure=False,
    )  # fmt: skip
    assert wait_until(pid_file.exists, 60)
    sandboxed_pid = tasks.read_pid(pid_file)
    # The Dask worker process running it (an ancestor: forkserver sits between): killed.
    workers = set(client.run(os.getpid).values())
    holders = [p.pid for p in psutil.Process(sandboxed_pid).parents() if p.pid in workers]
    assert len(holders) == 1
    holder = holders[0]
    pid_file.unlink()
    (tmp_path / "go").touch()  # the rerun may finish at once
    os.kill(holder, signal.SIGKILL)
    result = future.result(timeout=90 * SCALE)  # Dask reran it on a worker (a restarted one)
    assert result.success and result.result is True
    assert wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 60)
