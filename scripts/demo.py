"""The main job, end to end: convert a folder of untrusted files under hard limits.

Creates sample inputs (ordinary documents plus hostile ones: a decompression bomb that makes the
converter allocate far past the limit, one that hangs, one that forks without end, one that
crashes the parser), runs them through ``ProcessManager`` exactly as a Glasswall user would, and
prints one line per file and a summary.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import pathlib
import sys
import time
import zlib

from sandboxrun import ProcessManager, Task, detect

MIB = 1024 * 1024


def convert(input_file: str, output_file: str) -> dict:
    """A deliberately naive converter: it trusts what the file says about itself."""
    data = pathlib.Path(input_file).read_bytes()
    if data.startswith(b"ZBOMB"):  # "decompress" to the size the header claims
        claimed = int(data[5:].split(b"\n", 1)[0])
        blocks = []
        while len(blocks) * 16 * MIB < claimed:
            blocks.append(b"x" * (16 * MIB))  # written, so really resident, like an inflater
        data = b"".join(blocks)
    elif data.startswith(b"LOOP"):  # a parser stuck on a cyclic structure
        while True:
            time.sleep(0.05)
    elif data.startswith(b"FORK"):  # a "helper" that spawns helpers
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    elif data.startswith(b"CRASH"):  # a native parser dereferencing a bad offset
        ctypes.string_at(0)
    out = zlib.compress(data)
    pathlib.Path(output_file).write_bytes(out)
    return {"in_bytes": len(data), "out_bytes": len(out), "sha256": hashlib.sha256(data).hexdigest()[:12]}


def make_samples(directory: pathlib.Path) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    samples = {f"report-{n:02d}.txt": (f"quarterly report {n}\n" * (2000 * n)).encode() for n in range(1, 9)}
    samples |= {
        "bomb.zip": b"ZBOMB" + str(8 * 1024 * MIB).encode() + b"\n",
        "hang.pdf": b"LOOP\n",
        "forkbomb.doc": b"FORK\n",
        "crash.xls": b"CRASH\n",
    }
    for name, content in samples.items():
        (directory / name).write_bytes(content)
    return sorted(directory / name for name in samples)


def verdict(result) -> str:
    if result.success:
        return "ok"
    if result.timed_out:
        return "timed out"
    if result.out_of_memory:
        return "out of memory"
    return f"failed: {type(result.exception).__name__}: {result.exception}"[:70]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="demo-output", type=pathlib.Path)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    inputs = make_samples(args.work_dir / "input")
    output = args.work_dir / "output"
    output.mkdir(parents=True, exist_ok=True)
    report = detect()
    print(f"backend: {report['chosen'] if args.backend == 'auto' else args.backend} "
          f"(kernel {report['kernel']})")
    started = time.monotonic()
    with ProcessManager(
        max_workers=None, worker_timeout_seconds=5, memory_limit_in_gib=0.5,
        max_processes=64, cpu_time_limit_seconds=10, backend=args.backend,
    ) as manager:  # fmt: skip
        for path in inputs:
            target = output / (path.name + ".z")
            manager.queue_task(Task(convert, kwargs={"input_file": str(path), "output_file": str(target)}))
        print(f"{'file':<16} {'verdict':<40} {'exit':>5} {'peak MiB':>9} {'seconds':>8}")
        counts: dict[str, int] = {}
        for result in manager.as_completed():
            name = pathlib.Path(result.task.kwargs["input_file"]).name
            text = verdict(result)
            counts[text.split(":")[0]] = counts.get(text.split(":")[0], 0) + 1
            print(f"{name:<16} {text:<40.40} {result.exit_code:>5} "
                  f"{result.max_memory_used_in_gib * 1024:>9.1f} {result.elapsed_time:>8.2f}")
    print(f"{len(inputs)} files in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{count} {name}" for name, count in sorted(counts.items())))
    # Exit 0 only when every hostile file was contained the way it should be.
    expected = {"ok": 8, "timed out": 2, "out of memory": 1, "failed": 1}
    return 0 if counts == expected else 1


if __name__ == "__main__":
    sys.exit(main())
