"""The orchestrator: which tools, what sizes, how many rounds; each measurement in a fresh
interpreter (``child``), retried when another engineer's qemu VM overlapped it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import GIB, MIB
from .child import RESULT_MARK
from .figures import values
from .launcher import LAUNCHER_TOOLS
from .tools import CANNOT, select, unavailable

SCALE_BUDGET_S = 120  # per tool and size in "cost as work grows"
QEMU_BUDGET_S = 1200  # waiting for other engineers' VMs, in all


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "rounds": 1,
            "throughput": 20,
            "cpu_sleep": 0.3,
            "strict": {"limit": 256 * MIB, "step": 64 * MIB, "total": 1 * GIB},
            "peak_mib": [50],
            "peak_hold": 0.2,
            "timeout": {"timeout": 0.5, "cap": 3.0},
            "bigresult": 32 * MIB,
            "scale": [20, 50],
            "floor_n": 30,
            "idle_n": 2,
            "cpu_overhead": {"n": 20, "rounds": 2},
            "cpu_kill": {"runs": 1},
            "launch": {"n": 30, "heap_mib": 50},
            "isolation": {"n": 10, "rounds": 1},
        }
    return {
        "rounds": 3,
        "throughput": 300,
        "cpu_sleep": 2.0,
        "strict": {"limit": 256 * MIB, "step": 64 * MIB, "total": 2 * GIB},
        "peak_mib": [50, 300, 1000],
        "peak_hold": 1.0,
        "timeout": {"timeout": 1.0, "cap": 10.0},
        "bigresult": 256 * MIB,
        "scale": [100, 1000, 10000],
        "floor_n": 300,
        "idle_n": 5,
        "cpu_overhead": {"n": 300, "rounds": 10},
        "cpu_kill": {"runs": 20},
        "launch": {"n": 1000, "heap_mib": 200},
        "isolation": {"n": 500, "rounds": 4},
    }


def spawn_one(tool: str, case: str, params: dict[str, Any], limit: float = 1800) -> dict[str, Any]:
    # Imported as the package ``bench`` (from cached .pyc), not run as a script: under
    # forkserver every task process would otherwise re-run and re-compile a script as
    # ``__mp_main__``, a cost that belongs to this benchmark, not to the tool.
    command = [sys.executable, "-c",
               "import sys, bench.child; sys.exit(bench.child.main(sys.argv[1:]))",
               "--one", tool, case, json.dumps(params)]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {limit:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)[:300]}"}


def qemu_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True)
    return found.returncode == 0


def wait_for_quiet_machine(note: list[str], budget_s: float = QEMU_BUDGET_S) -> float:
    """Another engineer's qemu VM would distort every figure: wait (30 s polls, 20 min max).

    Returns the seconds waited."""
    waited = 0
    while qemu_running():
        if waited >= budget_s:
            text = "a qemu VM was still running after 20 min of waiting: measured alongside it"
            if text not in note:
                note.append(text)
                print(f"bench: {text}", file=sys.stderr)
            return waited
        if waited == 0:
            print("bench: qemu-system is running, waiting for it (30 s polls)", file=sys.stderr)
        time.sleep(30)
        waited += 30
    return waited


class Runner:
    def __init__(self, args: argparse.Namespace, notes: list[str]) -> None:
        self.args = args
        self.notes = notes
        self.guard = not args.quick and not args.no_wait
        self.waited = 0.0
        self.redone = 0
        self.s = sizes(args.quick)
        self.data: dict[str, Any] = {"runs": {}, "skipped": {}, "floor": {}}
        self.tools: list[str] = []
        for tool in select(args.only):
            reason = unavailable(tool)
            if reason is None:
                self.tools.append(tool)
            elif tool != "sandboxrun-cgroup_v2" or "cgroup_v2" in (args.only or []):
                self.data["skipped"][tool] = reason

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def spawn(self, tool: str, case: str, params: dict[str, Any]) -> dict[str, Any]:
        """One measurement; in a full run, one that overlapped a qemu VM is measured again."""
        for _ in range(3):
            if self.guard and qemu_running():
                self.waited += wait_for_quiet_machine(self.notes, QEMU_BUDGET_S - self.waited)
            result = spawn_one(tool, case, params)
            if not (self.guard and qemu_running() and self.waited < QEMU_BUDGET_S):
                break
            self.redone += 1
        return result

    def measure(
        self,
        key: str,
        case: str,
        params: dict[str, Any],
        rounds: int,
        tools: list[str] | None = None,
    ) -> None:
        """``rounds`` rounds; within a round every tool once, so slow drift hits all alike."""
        tools = [t for t in (tools or self.tools) if (t, case) not in CANNOT]
        store = self.data["runs"].setdefault(key, {"params": params, "rounds": {}})
        for round_number in range(rounds):
            for tool in tools:
                result = self.spawn(tool, case, params)
                store["rounds"].setdefault(tool, []).append(result)
                shown = {k: v for k, v in result.items() if k != "timeline"}
                self.log(f"{key} {tool} round {round_number + 1}/{rounds}: {shown}")

    def run(self) -> dict[str, Any]:
        s = self.s
        rounds = self.args.rounds or s["rounds"]
        self.data["rounds"] = rounds
        self.log(f"tools: {', '.join(self.tools)}; skipped: {self.data['skipped']}")
        self.data["floor"]["fork"] = [
            self.spawn("floor", "fork", {"n": s["floor_n"] * 4}) for _ in range(rounds)
        ]
        self.data["floor"]["cgroup_v1"] = [
            self.spawn(
                "floor", "cgroup_v1", {"n": s["floor_n"], "idle_n": s["idle_n"], "idle_s": 0.3}
            )
            for _ in range(rounds)
        ]
        self.log(f"floor: {self.data['floor']}")
        self.measure("throughput", "throughput", {"n": s["throughput"]}, rounds)
        launch = [t for t in LAUNCHER_TOOLS if t in self.tools]
        for name, heap in (("small", 0), ("server", s["launch"]["heap_mib"])):
            params = {"n": s["launch"]["n"], "heap_mib": heap}
            self.measure(f"launch-{name}", "launch", params, rounds, launch)
        ours = [t for t in self.tools if t.startswith("sandboxrun-")][:1]
        if ours:
            self.measure("profile", "profile", {"n": s["throughput"]}, 1, ours)
            # its rounds are inside the case (interleaved profiles): one measurement; only the
            # zygote isolates (the portable transport's spawn cannot: no such section there)
            from sandboxrun._launch import default_start_method

            if default_start_method() == "zygote":
                self.measure("isolation", "isolation", s["isolation"], 1, ours)
        if ours and not self.args.quick:  # scripts/bench/scaleout.py; Dask only when installed
            self.measure("executor", "executor", {"n": s["throughput"] // 3}, rounds, ours)
            if importlib.util.find_spec("distributed") is not None:
                self.measure("dask", "dask", {"n": 12, "cpu_s": 0.5}, rounds, ours)
        self.measure("cpu", "cpu", {"sleep": s["cpu_sleep"]}, rounds)
        if ours:  # its rounds are inside the case (interleaved): one measurement each
            self.measure("cpu_overhead", "cpu_overhead", s["cpu_overhead"], 1, ours)
            self.measure("cpu_kill", "cpu_kill", s["cpu_kill"], 1, ours)
        self.measure("strict", "strict", s["strict"], rounds)
        for mib in s["peak_mib"]:
            for hold in (0.0, s["peak_hold"]):
                params = {"mib": mib, "hold": hold, "limit_gib": 4}
                self.measure(f"peak-{mib}-{hold}", "peak", params, rounds)
        self.measure("timeout", "timeout", s["timeout"], rounds)
        self.measure("bigresult", "bigresult", {"size": s["bigresult"]}, rounds)
        for n in s["scale"]:
            for tool in self._scale_tools(n):
                # As many rounds as fit in about two minutes, at least one.
                rate = self.median("throughput", tool, "tasks_per_s")
                fit = int(SCALE_BUDGET_S * rate / n) if rate else 1
                self.measure(f"scale-{n}", "scale", {"n": n}, max(1, min(rounds, fit)), [tool])
        return self.data

    def _scale_tools(self, n: int) -> list[str]:
        """sandboxrun and GPM always; in a full run a peer only if a round fits the budget."""
        if self.args.quick:
            return self.tools

        def fits(tool: str) -> bool:
            rate = self.median("throughput", tool, "tasks_per_s")
            return rate is not None and rate > 0 and n / rate <= SCALE_BUDGET_S

        tools = [t for t in self.tools if t.startswith("sandboxrun-") or t == "glasswall"
                 or fits(t)]  # fmt: skip
        for peer in set(self.tools) - set(tools):
            rate = self.median("throughput", peer, "tasks_per_s")
            minutes = f"~{n / rate / 60:.0f} min per round" if rate else "too long"
            self.data.setdefault("scale_skipped", {})[peer] = (
                f"not run at {n}: at its measured {rate or 0:.0f} tasks/s that is {minutes}"
            )
        return tools

    def median(self, key: str, tool: str, field: str) -> float | None:
        found = values(self.data, key, tool, field)
        return statistics.median(found) if found else None
