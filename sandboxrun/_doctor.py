"""``sandboxrun doctor``: what enforces the limits here, why, and how to get something stronger."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

from ._backends import cgroupfs, detect
from ._backends.cgroupfs import mounts, own_cgroups
from ._backends.hosts import cgroup_host

LIMITS = {
    "memory": "memory limit",
    "processes": "process-count limit",
    "tree_kill": "kill of the whole process tree",
    "peak_memory": "peak-memory measurement",
    "oom_detection": "out-of-memory detection",
    "cpu_time": "CPU-time accounting",
    "cpu_quota": "per-task CPU quota",
}
#: What no poll can stand in for: without the kernel it is not there at all (the manager
#: refuses it at construction).
KERNEL_ONLY = ("cpu_quota",)


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "unknown"


def leftover_cgroups() -> list[str]:
    """Cgroups sandboxrun could not remove: this process's deferred ones, and the runner
    directories of managers that died (``sandboxrun-<pid>-*`` whose pid is gone)."""
    found = [str(path) for path in cgroupfs.LEFTOVERS.paths()]
    own = own_cgroups()
    for kind, point, options in mounts():
        matching = (k for k in own if set(k.split(",")) & options)
        key = "" if kind == "cgroup2" else next(matching, None)
        if key is not None and key in own:
            found += [str(p) for p in cgroupfs.stale_runner_dirs(point / own[key].lstrip("/"))]
    return sorted(dict.fromkeys(found))


def _fixes(report: dict[str, Any], systemd: bool, v2_controllers: list[str]) -> list[str]:
    chosen = report["chosen"]
    fixes: list[str] = []
    if chosen == "psutil" and platform.system() == "Linux":
        if systemd:
            fixes.append(
                "run under a delegated scope: systemd-run --scope -p Delegate=yes "
                "--slice=sandboxrun.slice sandboxrun ... (add --user as an unprivileged user)"
            )
            fixes.append("or, in a service unit: Delegate=yes (then auto uses cgroup_v2)")
        fixes.append(
            "in a container: give it its own writable cgroup (docker/podman --cgroupns=private"
            " and a cgroup v2 host; not --cgroupns=host with a read-only /sys/fs/cgroup)"
        )
        fixes.append(
            "or point SANDBOXRUN_CGROUP_ROOT at a cgroup v2 directory delegated to this user"
        )
    if chosen == "cgroup_v1":
        fixes.append(
            "cgroup v1 works, but v2 is stronger (memory.peak, cgroup.kill, memory.oom.group):"
            " boot with systemd.unified_cgroup_hierarchy=1"
            + ("" if "memory" in v2_controllers else " (here cgroup2 has no memory controller)")
        )
    if not importlib.util.find_spec("pystemd") and systemd:
        fixes.append(
            "pystemd (extra [systemd]) is missing: apt-get install libsystemd-dev pkg-config gcc"
            " && pip install 'sandboxrun[systemd]'"
        )
    return fixes


_LAYOUTS = {
    "unified": "unified (cgroup v2)",
    "hybrid": "hybrid (v1 controllers + cgroup2)",
    "legacy": "legacy (cgroup v1)",
    "none": "none",
}


def doctor_report() -> dict[str, Any]:
    report = detect()
    cgroup_mounts = [
        {"type": kind, "mount": str(point), "options": sorted(options)}
        for kind, point, options in mounts()
    ]
    host = cgroup_host()
    v2_controllers = sorted(host.v2_controllers)
    layout = _LAYOUTS[host.layout]
    systemd = _pid1() == "systemd"
    chosen = report["backends"][report["chosen"]]
    enforced = set(chosen.get("kernel_enforced", []))
    report.update(
        {
            "cgroup_layout": layout,
            "cgroup_mounts": cgroup_mounts,
            "cgroup2_controllers": v2_controllers,
            "own_cgroups": own_cgroups(),
            "uid": os.getuid() if hasattr(os, "getuid") else None,
            "pid1": _pid1(),
            "systemd": systemd,
            "pystemd": importlib.util.find_spec("pystemd") is not None,
            "kernel_enforced": [text for key, text in LIMITS.items() if key in enforced],
            "polled": [
                text
                for key, text in LIMITS.items()
                if key not in enforced and key not in KERNEL_ONLY
            ],
            "unavailable": [LIMITS[key] for key in KERNEL_ONLY if key not in enforced],
            "fixes": _fixes(report, systemd, v2_controllers),
            "leftover_cgroups": leftover_cgroups(),
        }
    )
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"backend (auto): {report['chosen']}",
        f"kernel: {report['kernel']}    platform: {report['platform']}",
        f"cgroup layout: {report['cgroup_layout']}",
        f"cgroup2 controllers: {' '.join(report['cgroup2_controllers']) or '(none)'}",
        f"pid 1: {report['pid1']}    systemd: {report['systemd']}    pystemd: {report['pystemd']}",
        "own cgroups: "
        + ", ".join(f"{key or 'v2'}={path}" for key, path in report["own_cgroups"].items()),
        "",
        "backends:",
    ]
    for name, entry in report["backends"].items():
        state = "usable" if entry["available"] else f"no: {entry['reason']}"
        lines.append(f"  {name:<10} {state}")
    lines += [
        "",
        "enforced by the kernel here: " + (", ".join(report["kernel_enforced"]) or "nothing"),
    ]
    lines.append("polled here: " + (", ".join(report["polled"]) or "nothing"))
    if report["unavailable"]:
        lines.append("not available here: " + ", ".join(report["unavailable"]))
    lines.append("leftover cgroups: " + (" ".join(report["leftover_cgroups"]) or "none"))
    if report["fixes"]:
        lines += ["", "to get stronger enforcement:"] + [f"  - {fix}" for fix in report["fixes"]]
    return "\n".join(lines)
