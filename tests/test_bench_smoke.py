"""scripts/bench.py (the `bench` package) --quick runs without the peers or matplotlib and
writes a well-formed report."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import AVAILABLE, SCALE

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BENCH = SCRIPTS / "bench.py"
SECTIONS = [
    "## Machine",
    "## Targets",
    "## 1. Throughput",
    "## 2. Parent CPU",
    "## 3. Memory-limit strictness",
    "## 4. Peak-memory accuracy",
    "## 5. Timeout enforcement",
    "## 6. A ",
    "## 7. Cost as work grows",
    "## 8. CPU-time limit",
    "## 9. The launcher",
    "## 10. What isolation costs",
    "## Physical floor",
]
NUMBER = r"-?\d[\d ]*(?:\.\d+)?"
FIGURE = re.compile(rf"^{NUMBER}(?: / {NUMBER} / {NUMBER})?$")


def _tables(text: str) -> dict[str, list[list[str]]]:
    """{section heading: rows of its first table, header row included}."""
    found: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            found.setdefault(heading, []).append(cells)
    return found


def _number(cell: str) -> float:
    return float(cell.split(" / ")[1 if " / " in cell else 0].replace(" ", ""))


def _row(rows: list[list[str]], label: str) -> list[str]:
    matches = [row for row in rows if row[0] == label]
    assert matches, f"no row {label!r} in {rows}"
    return matches[0]


@pytest.mark.slow
@pytest.mark.timeout(120)  # ~75 s on a loaded 2-core machine in the portable pass
@pytest.mark.skipif(SCALE > 1, reason="a benchmark under emulation measures the emulator")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bench.py measures Linux")
def test_quick_bench_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    monkeypatch.syspath_prepend(str(SCRIPTS))
    before = _own_floor_cgroups()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "sandboxrun", "--out", str(tmp_path),
         "--json", str(tmp_path / "raw.json"), "--quiet"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "benchmarks.md").read_text()
    raw = json.loads((tmp_path / "raw.json").read_text())["data"]
    failed = [
        (key, tool, result)
        for key, run in raw["runs"].items()
        for tool, rounds in run["rounds"].items()
        for result in rounds
        if set(result) == {"error"}
    ]
    assert not failed, failed
    from sandboxrun._launch import ZYGOTE_AVAILABLE

    for section in SECTIONS:
        if section.startswith("## 10.") and not ZYGOTE_AVAILABLE:
            continue  # only the zygote isolates: no profiles to compare without it
        assert section in text, f"missing {section!r}"
    assert "(**--quick**" in text
    assert "failed:" not in text, text
    tables = _tables(text)

    def table(prefix: str) -> list[list[str]]:
        key = next(heading for heading in tables if heading.startswith(prefix))
        rows = tables[key]
        assert all(len(row) == len(rows[0]) for row in rows), f"ragged table {key}: {rows}"
        return rows

    ours = "sandboxrun (psutil)"
    throughput = table("## 1.")
    assert _number(_row(throughput, ours)[1]) > 0
    cpu = table("## 2.")
    assert 0 <= _number(_row(cpu, ours)[1]) < 5
    strict = table("## 3.")
    assert _number(_row(strict, ours)[2]) > 0  # peak VmHWM
    assert _row(strict, ours)[5] == "True"  # the polled limit fired
    peak = table("## 4.")
    truth, reported = (_number(cell) for cell in _row(peak, ours)[3:5])
    assert abs(reported - truth) < 0.5 * truth
    timeout = table("## 5.")
    assert FIGURE.match(_row(timeout, ours)[3]), _row(timeout, ours)
    big = table("## 6.")
    assert _number(_row(big, ours)[1]) > 0
    scale = table("## 7.")
    assert [row[1] for row in scale if row[0] == ours] == ["20", "50"]
    profile = table("### Where the manager's time goes")
    assert profile[-1][0] == "**wall time per task (profiled)**"
    assert all(float(row[1]) >= -0.5 for row in profile[1:]), profile
    if "cgroup_v1" in AVAILABLE and ZYGOTE_AVAILABLE:  # the first kernel backend, the zygote
        profiles = table("## 10.")
        assert [row[1] for row in profiles[1:]] == ["`none`", "`default`", "`strict`"], profiles
        assert all(_number(row[2]) > 0 for row in profiles[1:]), profiles
    floor = table("## Physical floor")
    assert _number(floor[1][1]) > 0
    for rows in (throughput, cpu, peak, big, scale):  # every figure cell parses
        for row in rows[1:]:
            for cell in row[1:]:
                if " / " in cell or re.fullmatch(NUMBER, cell):
                    assert FIGURE.match(cell), (cell, row)
    if "cgroup_v1" in AVAILABLE:  # the kernel backend on a hybrid host: it must be measured
        kernel = _row(strict, "sandboxrun (cgroup_v1)")
        assert kernel[3] == "0", kernel  # no overshoot
        assert kernel[5] == "True"
        assert _number(_row(timeout, "sandboxrun (cgroup_v1)")[3]) < 1000
    assert _own_floor_cgroups() == before, "the cgroup floor left directories behind"


def _own_floor_cgroups() -> set[str]:
    """The benchmark's floor cgroups (``sbbench-*``) below this process's own v1 cgroups."""
    floor = importlib.import_module("bench.floor")  # scripts/ is on sys.path
    try:
        own = floor.v1_own_dirs()
    except OSError:
        return set()
    return {str(path) for directory in own.values() for path in directory.glob("sbbench-*")}
