"""The machine's load around a cell (load averages, CPU steal), and whether it was enough to disturb the timings."""

from __future__ import annotations

import os
from pathlib import Path

# A cell ran "under load" when a 1-minute load average reached LOADED_PER_CORE per core (the cell's
# own threads account for at most one per core), or when the hypervisor stole STEAL_LIMIT of the CPU.
LOADED_PER_CORE = 1.5
STEAL_LIMIT = 0.05
PROC_STAT = Path("/proc/stat")


def cpu_times() -> list[int] | None:
    """The kernel's aggregate CPU counters (user nice system idle iowait irq softirq steal ...), None where absent."""
    try:
        first = PROC_STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return [int(v) for v in first[1:]] if first and first[0] == "cpu" else None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def snapshot() -> dict:
    """Load averages and CPU counters, now."""
    return {"loadavg": loadavg(), "cpu": cpu_times()}


def summary(start: dict, end: dict) -> dict:
    """The record's env.load: load averages at start and end, and the fraction of CPU time stolen in between
    (None where the kernel does not count steal)."""
    steal = None
    a, b = start.get("cpu"), end.get("cpu")
    if a and b and len(a) >= 8 and len(b) >= 8:
        total = sum(b[:8]) - sum(a[:8])
        steal = round((b[7] - a[7]) / total, 4) if total > 0 else None
    return {"start": start.get("loadavg"), "end": end.get("loadavg"), "cpu_steal": steal}


def under_load(env: dict) -> str | None:
    """Why a record's cell ran under load ("load 5.1 on 2 cores", "12% CPU stolen"), or None."""
    load, cores = env.get("load") or {}, env.get("cpu_count") or 1
    peak = max((v[0] for v in (load.get("start"), load.get("end")) if v), default=None)
    if peak is not None and peak >= LOADED_PER_CORE * cores:
        return f"load {peak:.1f} on {cores} cores"
    if (load.get("cpu_steal") or 0) >= STEAL_LIMIT:
        return f"{load['cpu_steal']:.0%} CPU stolen"
    return None
