"""The measured sections of docs/benchmarks.md (1-7 and the floor), each a heading, a paragraph
saying what was measured and how, and a table; and the accessors they read the raw data with
(see ``figures`` for its shape). ``report`` adds the header and the verdicts on top."""

# ruff: noqa: RUF001 - the report is typeset: the multiplication and minus signs are meant
from __future__ import annotations

import statistics
from typing import Any

from . import GIB, MIB
from .figures import (
    errors,
    floor_values,
    fmt,
    median_or_none,
    ratio,
    rounds_of,
    section,
    tri,
    values,
)
from .run import SCALE_BUDGET_S
from .tools import CANNOT, LABELS, TRUSTED, TRUSTED_TWIN


class Sections:
    def __init__(self, data: dict[str, Any], meta: dict[str, Any], quick: bool) -> None:
        self.d = data
        self.meta = meta
        self.quick = quick
        self.ours = next(
            (f"sandboxrun-{b}" for b in ("cgroup_v2", "cgroup_v1") if self._has(f"sandboxrun-{b}")),
            "sandboxrun-psutil",
        )
        self.tools = [t for t in LABELS if self._has(t)]

    def _has(self, tool: str) -> bool:
        return any(tool in run["rounds"] for run in self.d["runs"].values())

    def label(self, tool: str) -> str:
        return LABELS.get(tool, tool)

    def v(self, key: str, tool: str, field: str) -> list[float]:
        return values(self.d, key, tool, field)

    def med(self, key: str, tool: str, field: str) -> float | None:
        return median_or_none(self.v(key, tool, field))

    def rounds(self, key: str, tool: str) -> int:
        return len(rounds_of(self.d, key, tool))

    def params(self, key: str) -> dict[str, Any]:
        """The parameters a measurement ran with (empty when it did not run)."""
        found: dict[str, Any] = self.d["runs"].get(key, {}).get("params", {})
        return found

    def _plot(self, image: str) -> list[str]:
        """The Markdown of a plot and a blank line, or nothing when the plots were skipped."""
        return [image, ""] if self.d.get("plots") else []

    def na(self, tool: str, case: str) -> str | None:
        if (tool, case) in CANNOT:
            return f"n/a: {CANNOT[(tool, case)]}"
        return None

    def floor_of(self, name: str, field: str) -> list[float]:
        return floor_values(self.d, name, field)

    # ---------------------------------------------------------------------------- sections

    def throughput(self) -> list[str]:
        n = self.params("throughput").get("n")
        rows = []
        gpm = self.med("throughput", "glasswall", "tasks_per_s")
        for tool in self.tools:
            values = self.v("throughput", tool, "tasks_per_s")
            rows.append([
                self.label(tool), tri(values), ratio(
                    median_or_none(values), gpm),
                tri(self.v("throughput", tool, "parent_cpu_ms"), 2),
                "n/a (forkserver's children)" if tool == "ppe"
                else tri(self.v("throughput", tool, "children_cpu_ms"), 2),
                str(self.rounds("throughput", tool)), errors(self.d, "throughput", tool),
            ])  # fmt: skip
        fork = self.floor_of("fork", "per_task_ms")
        cg = self.floor_of("cgroup_v1", "total_ms")
        if fork:
            rows.append(["floor: bare fork + _exit + waitpid, one at a time",
                         tri([1000 / x for x in fork]), "", "", "", str(len(fork)), "serial"])
        if cg:
            rows.append(["floor: fork + cgroup v1 mkdir/enter/rmdir, one at a time",
                         tri([1000 / x for x in cg]), "", "", "", str(len(cg)), "serial"])
        return section(
            "## 1. Throughput: trivial tasks, a fresh process each",
            f"{n} tasks returning their argument, `max_workers=2`; wall time from constructing the"
            " manager to the last result (pool start-up and shut-down included). *CPU per task*:"
            " `getrusage` of the manager process (all its threads) and of its reaped children"
            " (for GPM: watchers and tasks), divided by the number of tasks; the machine has 2"
            " cores for all of it.",
            header=["tool", "tasks/s", "vs GPM", "manager CPU ms/task", "children CPU ms/task",
                    "rounds", "note"],
            rows=rows,
            after=[
                *self._plot("![throughput](bench-throughput.png)"),
                *self.profile(),
            ],
        )

    def profile(self) -> list[str]:
        runs = self.d["runs"].get("profile", {})
        (tool, rounds), *_ = list(runs.get("rounds", {}).items()) or [(None, [])]
        result = next((r for r in rounds if "buckets_ms" in r), None)
        if result is None:
            return []
        wall = result["wall_ms"]
        rows = [
            [label, fmt(ms, 3), f"{ms / wall * 100:.0f} %"]
            for label, ms in result["buckets_ms"].items()
        ]
        rows.append(["**wall time per task (profiled)**", fmt(wall, 3), "100 %"])
        return section(
            f"### Where the manager's time goes ({self.label(tool)})",
            f"One more throughput run of {result['n']} tasks under cProfile, in a fresh"
            " interpreter; the manager's wall time per task split by where its single thread"
            " was. cProfile slows the Python-level parts (roughly 1.5-2×), not the system calls,"
            " so the profiled wall time is longer than the unprofiled one above.",
            header=["where", "ms per task", "share"],
            rows=rows,
        )

    def cpu(self) -> list[str]:
        params = self.params("cpu")
        gpm = self.med("cpu", "glasswall", "parent_cpu_s")
        rows = []
        for tool in self.tools:
            parent = self.v("cpu", tool, "parent_cpu_s")
            helpers = self.v("cpu", tool, "helpers_cpu_s")
            rows.append([
                self.label(tool), tri(parent, 3),
                tri(helpers, 3) if tool != "ppe" else "n/a (forkserver's children)",
                tri(self.v("cpu", tool, "tasks_cpu_s"), 3),
                ratio(median_or_none(parent), gpm, inverse=True),
                str(self.rounds("cpu", tool)),
            ])  # fmt: skip
        return section(
            f"## 2. Parent CPU while two tasks sleep {params.get('sleep')} s",
            "CPU seconds (user + sys, `getrusage(RUSAGE_SELF)`, all threads) of the measuring"
            " process, which is the manager, over the whole run. *Helpers*: `RUSAGE_CHILDREN`"
            " minus the tasks' own CPU (each task returns its `RUSAGE_SELF` from inside the"
            " function): GPM's watcher processes; for sandboxrun and pebble only the workers'"
            " own start-up and exit around the function. *GPM ÷ tool*: how many times less CPU"
            " the manager process burns than GPM's.",
            header=["tool", "manager CPU s", "helpers CPU s", "tasks CPU s", "GPM ÷ tool",
                    "rounds"],
            rows=rows,
        )

    def strict(self) -> list[str]:
        params = self.params("strict")
        rows = []
        for tool in self.tools:
            na = self.na(tool, "strict")
            if na:
                rows.append([self.label(tool), na, "", "", "", "", "", ""])
                continue
            rounds = rounds_of(self.d, "strict", tool)
            ok = [r for r in rounds if "peak_hwm_mib" in r]
            oom = sorted({str(r.get("reported_oom")) for r in ok})
            completed = sum(1 for r in ok if r.get("completed"))
            rows.append([
                self.label(tool), tri(self.v("strict", tool, "peak_alloc_mib"), 0),
                tri(self.v("strict", tool, "peak_hwm_mib"), 0),
                tri(self.v("strict", tool, "overshoot_mib"), 0),
                tri(self.v("strict", tool, "last_step_ms"), 0), "/".join(oom) or "n/a",
                tri(self.v("strict", tool, "reported_max_mib"), 0),
                f"{len(rounds)}" + (f", {completed} ran to the end" if completed else ""),
            ])  # fmt: skip
        limit = params.get("limit", 0) / MIB
        return section(
            f"## 3. Memory-limit strictness: a fast allocator under a {limit:.0f} MiB limit",
            f"The task appends `b\"x\" * {params.get('step', 0) // MIB} MiB` to a list as fast as"
            f" it can, up to {params.get('total', 0) / GIB:.0f} GiB, and after every step appends"
            " `ms-since-start allocated-bytes VmHWM` to a file of its own, so the peak it really"
            " reached is known whatever the tool says. *Peak allocated* / *peak VmHWM*: the last"
            " line logged before it died (the step that killed it is not logged). *Overshoot*:"
            " peak VmHWM minus the limit (VmHWM counts pages shared with the parent since fork"
            " — the interpreter — which the kernel charges to the parent, not to the task)."
            " *OOM reported*: the tool's `out_of_memory`.",
            header=["tool", "peak allocated MiB", "peak VmHWM MiB", "overshoot MiB",
                    "last step at ms", "OOM reported", "reported peak MiB", "rounds"],
            rows=rows,
            after=self._plot("![memory over time](bench-memory-limit.png)"),
        )

    def peak(self) -> list[str]:
        keys = [k for k in self.d["runs"] if k.startswith("peak-")]
        rows = []
        for key in keys:
            params = self.d["runs"][key]["params"]
            when = "at once" if not params["hold"] else f"after {params['hold']:g} s"
            for tool in self.tools:
                na = self.na(tool, "peak")
                if na:
                    if key == keys[0]:
                        rows.append([self.label(tool), "all", "", "", na, "", ""])
                    continue
                rows.append([
                    self.label(tool), f"{params['mib']} MiB", when,
                    tri(self.v(key, tool, "truth_mib"), 0),
                    tri(self.v(key, tool, "reported_mib"), 0),
                    tri(self.v(key, tool, "error_mib"), 1),
                    str(self.rounds(key, tool)),
                ])  # fmt: skip
        return section(
            "## 4. Peak-memory accuracy",
            "A task touches N MiB (`b\"x\" * N MiB`) and returns at once (< 10 ms after touching)"
            " or after holding it; *truth* is the task's own VmHWM, returned in its result;"
            " *reported* is `max_memory_used_in_gib` (× 1024). A 4 GiB limit is set for every"
            " tool, since GPM fills the field only under a limit. Error = reported − truth.",
            header=["tool", "touched", "returns", "truth MiB", "reported MiB", "error MiB",
                    "rounds"],
            rows=rows,
        )

    def timeout(self) -> list[str]:
        params = self.params("timeout")
        cap = params.get("cap", 0)
        rows = []
        for tool in self.tools:
            na = self.na(tool, "timeout")
            if na:
                rows.append([self.label(tool), na, "", "", "", "", ""])
                continue
            rounds = rounds_of(self.d, "timeout", tool)

            def cell(field: str, rounds: list[dict[str, Any]] = rounds) -> str:
                values = [r.get(field) for r in rounds if "survivors" in r]
                if not values:
                    return "n/a"
                if any(v is None for v in values):
                    alive = sum(1 for v in values if v is None)
                    return f"never (still alive after {cap:g} s, {alive}/{len(values)} rounds)"
                return tri([v for v in values if v is not None], 1)

            reported = sorted({str(r.get("reported_timed_out")) for r in rounds})
            stuck = sum(1 for r in rounds if r.get("tool_stuck"))
            rows.append([
                self.label(tool), cell("task_ms"), cell("grandchild_ms"), cell("last_ms"),
                "/".join(reported) + (f"; tool hung in {stuck} rounds" if stuck else ""),
                tri(self.v("timeout", tool, "entry_lag_ms"), 1), str(len(rounds)),
            ])  # fmt: skip
        return section(
            f"## 5. Timeout enforcement: the whole tree, timeout {params.get('timeout')} s",
            "The task ignores SIGTERM, starts `sleep 300` in its own session"
            " (`subprocess.Popen(..., start_new_session=True)`) and hangs (sandboxrun with"
            " `isolation=\"none\"` here: the default profile's fresh `/proc` hides the host pids"
            " polled; its tree kill is the same SIGKILL of the task's PID 1). The tool runs in a"
            " forked child of the measuring process, which polls both pids every millisecond"
            " (`/proc/PID/stat`; a zombie counts as gone). Milliseconds from the deadline until"
            " the process is gone. The deadline is the earlier of the task function's own entry"
            " time + timeout and the tool's reported `start_time` + timeout (GPM, sandboxrun;"
            " pebble reports none), so no latency is understated; the last column is how long"
            " after that clock start the function was entered (process start and, for"
            f" sandboxrun, entering the cgroups; negative for GPM, which reads its clock after"
            f" `Process.start()` returns). Waiting is capped at {cap:g} s, then the benchmark"
            " kills the two pids itself.",
            *self._entry_note(),
            header=["tool", "task gone ms", "grandchild gone ms", "last gone ms",
                    "timed_out reported", "task entered ms after clock start", "rounds"],
            rows=rows,
        )

    def _entry_note(self) -> list[str]:
        lag = self.med("timeout", "sandboxrun-cgroup_v1", "entry_lag_ms")
        idle = self.floor_of("cgroup_v1", "idle_enter_ms")
        warm = self.floor_of("cgroup_v1", "fork_enter_exit_ms")
        if not lag or not idle or not warm:
            return []
        return [
            "",
            f"On `cgroup_v1` a lone task's function starts {lag:.0f} ms (median) after the"
            " timeout clock: the worker moves itself into 5 cgroups first, and the first"
            " migration after a quiet moment waits for an RCU grace period (the kernel's"
            " `cgroup_threadgroup_rwsem`): the floor table measures fork + enter + exit at"
            f" {statistics.median(idle):.1f} ms after 0.3 s idle against"
            f" {statistics.median(warm):.1f} ms back to back. Throughput runs stay warm; a"
            " single task pays it, and its timeout includes it.",
        ]

    def bigresult(self) -> list[str]:
        params = self.params("bigresult")
        gpm_t = self.med("bigresult", "glasswall", "delivery_s")
        rows = []
        for tool in self.tools:
            delivery = self.v("bigresult", tool, "delivery_s")
            rows.append([
                self.label(tool), tri(delivery, 3),
                ratio(median_or_none(delivery), gpm_t, inverse=True),
                tri(self.v("bigresult", tool, "parent_peak_mib"), 0),
                tri(self.v("bigresult", tool, "parent_base_mib"), 0),
                tri(self.v("bigresult", tool, "children_peak_mib"), 0),
                str(self.rounds("bigresult", tool)), errors(self.d, "bigresult", tool),
            ])  # fmt: skip
        size = params.get("size", 0) / MIB
        return section(
            f"## 6. A {size:.0f} MiB bytes result",
            f"The task builds `b\"x\" * {size:.0f} MiB` and returns `(time.monotonic(), data)`."
            " *Delivery*: from that timestamp until the result is in the caller's hands"
            " (pickling, transfer, unpickling, bookkeeping). *Parent peak*: `ru_maxrss` of the"
            " measuring process at the end (*base*: before the tool started); *largest child*:"
            " `ru_maxrss` of `RUSAGE_CHILDREN` (GPM's watcher holds its own copies).",
            header=["tool", "delivery s", "GPM ÷ tool", "parent peak MiB", "parent base MiB",
                    "largest child MiB", "rounds", "note"],
            rows=rows,
        )

    def restricted_decoding(self) -> list[str]:
        """The restricted result decoding's cost: the same backend with trusted_results=True."""
        restricted = f"sandboxrun-{TRUSTED_TWIN}"
        rows = []
        for key, field, what in (
            ("throughput", "tasks_per_s", "throughput, tasks/s"),
            ("throughput", "parent_cpu_ms", "throughput, manager CPU ms per task"),
            ("throughput", "children_cpu_ms", "throughput, worker CPU ms per task"),
            ("bigresult", "delivery_s", "big result, delivery s"),
            ("bigresult", "parent_peak_mib", "big result, parent peak MiB"),
        ):
            ours, theirs = self.med(key, restricted, field), self.med(key, TRUSTED, field)
            share = None if ours is None or not theirs else ours / theirs
            rows.append([what, fmt(ours, 3), fmt(theirs, 3), fmt(share, 3)])
        return section(
            "## Restricted result decoding vs trusted_results=True",
            f"The throughput and big-result cases again on {TRUSTED_TWIN}, default (restricted"
            " unpickler, docs/security.md) against `trusted_results=True` (plain pickle), in"
            " the same run; medians. The goal: restricted ≤ 1.05 × trusted in time and CPU"
            " (≥ 0.95 in tasks/s).",
            header=["figure", "restricted", "trusted", "restricted ÷ trusted"],
            rows=rows,
        )

    def scale(self) -> list[str]:
        keys = [k for k in self.d["runs"] if k.startswith("scale-")]
        rows = []
        for tool in self.tools:
            for key in keys:
                n = self.d["runs"][key]["params"]["n"]
                if tool not in self.d["runs"][key]["rounds"]:
                    why = self.d.get("scale_skipped", {}).get(tool)
                    if why:
                        rows.append([self.label(tool), f"{n}", why, "", "", ""])
                    continue
                per = self.v(key, tool, "per_task_ms")
                gpm = self.med(key, "glasswall", "per_task_ms")
                rows.append([
                    self.label(tool), f"{n}", tri(per, 2),
                    ratio(median_or_none(per), gpm, inverse=True),
                    tri(self.v(key, tool, "maxrss_mib"), 0), str(self.rounds(key, tool)),
                ])  # fmt: skip
        return section(
            "## 7. Cost as work grows",
            "N trivial tasks, 2 workers: wall time ÷ N (*per-task overhead*), and the manager"
            " process's peak memory (`ru_maxrss`). Each tool gets as many rounds (up to"
            f" {self.d.get('rounds')}) as fit"
            f" in about {SCALE_BUDGET_S} s at its measured throughput.",
            header=["tool", "tasks", "ms per task", "GPM ÷ tool", "parent peak MiB", "rounds"],
            rows=rows,
        )

    def floor(self) -> list[str]:
        fork = self.floor_of("fork", "per_task_ms")
        cg = self.d["floor"].get("cgroup_v1", [])
        rows = [["bare `os.fork()` + `os._exit(0)` + `waitpid`", tri(fork, 3), "", ""]]
        unavailable = next((r["unavailable"] for r in cg if "unavailable" in r), None)
        if unavailable:
            rows.append(["cgroup v1 operations", f"n/a: {unavailable}", "", ""])
        elif cg:
            controllers = ", ".join(cg[0].get("controllers", []))
            rows += [
                [f"mkdir in each of {controllers}", tri(self.floor_of("cgroup_v1", "mkdir_ms"), 3),
                 "", ""],
                ["fork; child writes `0` to each `cgroup.procs`, exits; waitpid",
                 tri(self.floor_of("cgroup_v1", "fork_enter_exit_ms"), 3), "", ""],
                ["rmdir each", tri(self.floor_of("cgroup_v1", "rmdir_ms"), 3), "", ""],
                [f"fork + enter + exit + waitpid after {cg[0].get('idle_s')} s idle (first"
                 " migration waits for an RCU grace period)",
                 tri(self.floor_of("cgroup_v1", "idle_enter_ms"), 3), "", ""],
                ["**total per task** (median of the per-step medians)",
                 tri(self.floor_of("cgroup_v1", "total_ms"), 3),
                 tri(self.floor_of("cgroup_v1", "p90_total_ms"), 3),
                 tri([1000 / x for x in self.floor_of("cgroup_v1", "total_ms")], 0)],
            ]  # fmt: skip
        if fork:
            rows[0][3] = tri([1000 / x for x in fork], 0)
        n = cg[0].get("n") if cg else None
        return section(
            "## Physical floor on this kernel",
            "Measured in the same run, in fresh interpreters, one operation at a time (no"
            f" manager, no Python in the child): {n} cgroup rounds per measurement. The cgroup"
            " directories are made only below this process's own cgroups (as `/proc/self/cgroup`"
            " says) and all removed again.",
            header=["operation per task", "ms (median)", "p90 ms", "tasks/s if serial"],
            rows=rows,
        )
