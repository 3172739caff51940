"""The demo batch's two halves: sample files (ordinary and hostile) and a naive converter.

    python scripts/demo.py samples DIR          # write the sample inputs
    python scripts/demo.py convert INPUT OUTPUT # the converter sandboxrun batch runs per file
    python scripts/demo.py check JOURNAL        # exit 0 iff every file got the verdict it should

The converter trusts what each file says about itself, like a real parser facing hostile input:
a "decompression bomb" makes it allocate 8 GiB, another file sends it into an endless loop, one
makes it fork without end, one crashes it the way a native parser crashes on a bad offset.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import sys
import time
import zlib

MIB = 1024 * 1024
EXPECTED = {
    "bomb.zip": "out of memory",
    "hang.pdf": "timed out",
    "forkbomb.doc": "timed out",
    "crash.xls": "failed",
}
SYMLINK = "hostname.txt"
FILES = 13  # 8 reports, 4 hostile files, --help.txt; the symlink is not one of them


def samples(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        f"report-{n:02d}.txt": (f"quarterly report {n}\n" * (2000 * n)).encode()
        for n in range(1, 9)
    }
    files |= {
        "bomb.zip": b"ZBOMB" + str(8 * 1024 * MIB).encode() + b"\n",
        "hang.pdf": b"LOOP\n",
        "forkbomb.doc": b"FORK\n",
        "crash.xls": b"CRASH\n",
    }
    files["--help.txt"] = b"a name that a naive runner would hand over as an option\n"
    for name, content in files.items():
        (directory / name).write_bytes(content)
    # A symlink out of the input folder: sandboxrun batch skips it (no --follow-symlinks).
    (directory / SYMLINK).symlink_to("/etc/hostname")


def convert(input_file: pathlib.Path, output_file: pathlib.Path) -> None:
    data = input_file.read_bytes()
    if data.startswith(b"ZBOMB"):  # inflate to the size the header claims
        claimed = int(data[5:].split(b"\n", 1)[0])
        blocks = []
        while len(blocks) * 16 * MIB < claimed:
            blocks.append(b"x" * (16 * MIB))  # written, so really resident, like an inflater's
        data = b"".join(blocks)
    elif data.startswith(b"LOOP"):  # stuck on a cyclic structure
        while True:
            time.sleep(0.05)
    elif data.startswith(b"FORK"):  # a helper that spawns helpers
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    elif data.startswith(b"CRASH"):  # a native parser dereferencing a bad offset
        ctypes.string_at(0)
    output_file.write_bytes(zlib.compress(data))


def check(journal: pathlib.Path) -> int:
    verdicts = {}
    for line in journal.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            verdicts[entry["file"]] = entry["verdict"]
    wrong = {name: got for name, got in verdicts.items() if got != EXPECTED.get(name, "ok")}
    leaked = (journal.parent / f"{SYMLINK}.z").exists() or SYMLINK in verdicts
    if len(verdicts) != FILES or wrong or leaked:
        print(f"demo: unexpected verdicts {wrong} ({len(verdicts)} files)", file=sys.stderr)
        if leaked:
            print(f"demo: the symlink {SYMLINK} was followed", file=sys.stderr)
        return 1
    print("demo: every ordinary file converted; every hostile one contained as expected")
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "samples":
        samples(pathlib.Path(args[0]))
    elif command == "convert":
        convert(pathlib.Path(args[0]), pathlib.Path(args[1]))
    elif command == "check":
        sys.exit(check(pathlib.Path(args[0])))
    else:
        sys.exit(f"unknown command {command!r}")
