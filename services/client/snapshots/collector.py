"""The host self-snapshot collector: what a host can say about itself, from the standard library.

`host_facts()` is one JSON object (nested by topic, so diffs name fields such as
`host_facts.memory.available_mb`). Values that change on every call (uptime, load) are
rounded so that an idle host's consecutive snapshots diff to little.
Since issue 11 these are an opt-in extra of a snapshot (`gather(..., with_host_facts=True)`,
under `host_facts`), never mixed into the container's keys: they would change every diff.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["host_facts"]


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                out[name] = int(rest.split()[0]) // 1024  # kB -> MB
    except OSError:
        pass
    return out


def _uptime_h() -> float | None:
    try:
        return round(float(Path("/proc/uptime").read_text().split()[0]) / 3600, 1)
    except (OSError, ValueError, IndexError):
        return None


def host_facts(disk_path: str = "/") -> dict[str, Any]:
    """This host's facts: system, CPU, memory, disk, Python (stdlib only; Linux adds /proc)."""
    mem = _meminfo()
    disk = shutil.disk_usage(disk_path)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    facts: dict[str, Any] = {
        "system": {"os": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "cpu": {"count": os.cpu_count(), "load_1m": round(load[0], 1), "load_15m": round(load[2], 1)},
        "disk": {"path": disk_path, "total_gb": round(disk.total / 2**30, 1), "free_gb": round(disk.free / 2**30, 1)},
        "python": {"version": platform.python_version(), "executable": sys.executable},
    }
    if mem:
        facts["memory"] = {"total_mb": mem.get("MemTotal"), "available_mb": mem.get("MemAvailable")}
    uptime = _uptime_h()
    if uptime is not None:
        facts["uptime_h"] = uptime
    return facts
